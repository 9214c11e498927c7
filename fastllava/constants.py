"""Token constants, under the names LLaVA uses (llava/constants.py), so ported code reads the same."""

CONTROLLER_HEART_BEAT_EXPIRATION = 30
WORKER_HEART_BEAT_INTERVAL = 15

LOGDIR = "."

# Model constants
IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200  # placeholder id for one <image> in tokenized prompts; expanded to its slots later
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
IMAGE_PLACEHOLDER = "<image-placeholder>"
