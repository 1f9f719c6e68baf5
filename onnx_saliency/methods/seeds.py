"""Registers the seed methods: Relevance-CAM, guidance-rectified CAM, contrastive excitation backprop and
Gradual Extrapolation (`<method>+ge` names are resolved by get_method)."""

from . import register
from .excitation import ContrastiveExcitationBackprop
from .gradual import GradualExtrapolation
from .guidance_cam import GuidanceCAM
from .relevance_cam import RelevanceCAM

register(RelevanceCAM)
register(GuidanceCAM, aliases=("guidance-rectified-cam",))
register(ContrastiveExcitationBackprop, aliases=("cmwp", "c-mwp", "contrastive-eb"))
register(GradualExtrapolation, aliases=("ge",))
