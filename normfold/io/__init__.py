"""Loading and saving models safely, in four parts:

- `validate`: reading a model with every check first (one-line NormfoldError for each refusal);
- `external`: external data, where it may live, and writing weights to one external file;
- `protobuf`: the streaming protobuf writer and cheap message sizes;
- `staging`: every output staged beside its destination and committed together at the end.

Which paths a run reads and writes, and that they never overlap, is decided in normfold.paths.
"""

from normfold.io.external import EXTERNAL_THRESHOLD, approximate_size, check_external_location, external_locations
from normfold.io.protobuf import tensor_size, write_model
from normfold.io.staging import (STAGING_PREFIX, TWO_GB, StagedModel, Transaction, discard_all_staging,
                                 remove_stale_staging)
from normfold.io.files import regular_file_problem
from normfold.io.validate import load_model, read_model

__all__ = ["EXTERNAL_THRESHOLD", "STAGING_PREFIX", "TWO_GB", "StagedModel", "Transaction", "approximate_size",
           "check_external_location", "discard_all_staging", "external_locations", "load_model", "read_model", "regular_file_problem",
           "remove_stale_staging", "tensor_size", "write_model"]
