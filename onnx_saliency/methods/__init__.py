"""Method registry: name -> Method class. Aliases keep pytorch-grad-cam's spellings working."""

from .base import Method, Request, Result
from .cam import CAM_METHODS
from .gradients import GRADIENT_METHODS

METHODS = {cls.name: cls for cls in CAM_METHODS + GRADIENT_METHODS}
ALIASES = {"grad-cam": "gradcam", "gradcampp": "gradcam++", "gradcam-plusplus": "gradcam++",
           "score-cam": "scorecam", "eigen-cam": "eigencam", "layer-cam": "layercam", "xgrad-cam": "xgradcam",
           "hires-cam": "hirescam", "ig": "integrated-gradients", "gxi": "gradient-x-input",
           "saliency": "gradient", "vanilla-gradient": "gradient", "gbp": "guided-backprop",
           "smooth-grad": "smoothgrad"}


def register(cls, aliases=()):
    """Add a Method subclass (used by the LRP and seed-method modules), with optional alias names."""
    METHODS[cls.name] = cls
    ALIASES.update({alias: cls.name for alias in aliases})
    return cls


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> Method:
    from ..errors import SaliencyError

    key = ALIASES.get(name.lower(), name.lower())
    if key.endswith("+ge"):  # any method's map through Gradual Extrapolation
        from .gradual import GradualExtrapolation

        try:
            return GradualExtrapolation(get_method(key[:-3]))
        except SaliencyError as err:
            raise SaliencyError(f"-m {name!r}: no base method {key[:-3]!r} for +ge ({err})") from err
    if key not in METHODS:
        raise SaliencyError(f"-m {name!r}: unknown method; known: {', '.join(method_names())}")
    return METHODS[key]()


from . import lrp as _lrp  # noqa: E402,F401  registers lrp, excitation-backprop (needs register above)
from . import sr_map as _sr_map, tsgb as _tsgb  # noqa: E402,F401  registers sr-map, tsgb
from . import seeds as _seeds  # noqa: E402,F401  registers relevance-cam, guidance-cam, cmwp, gradual-extrapolation
from . import rollout as _rollout  # noqa: E402,F401  registers rollout, gradient-rollout (transformers)

__all__ = ["Method", "Request", "Result", "METHODS", "get_method", "method_names", "register"]
