"""Code versions of the stages, folded into the identity of what each stage builds.

Snakemake does not track helper modules a script imports, so a change to a stage's output format
bumps its number here, which changes every artefact path or fingerprint that depends on it.
"""

#: Bump when the templated dataset written by ``tunemake.data`` changes for the same recipe.
DATA_CODE_VERSION = 3

#: Bump when ``tunemake.train`` gives different weights for the same inputs.
TRAIN_CODE_VERSION = 3
