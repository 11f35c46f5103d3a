from .promptable_sam import PromptableSAM, ReferencePolicy, policy
from .sam_builder import SAM_SIZES, CheckpointError, build_sam, load_sam_checkpoint, save_sam_checkpoint

__all__ = ["PromptableSAM", "ReferencePolicy", "policy", "SAM_SIZES", "CheckpointError", "build_sam",
           "load_sam_checkpoint", "save_sam_checkpoint"]
