"""`from configuration_clara import ClaraConfig`: the config lives beside the model so checkpoints carry it."""

from modeling_clara.configuration_clara import ClaraConfig

__all__ = ["ClaraConfig"]
