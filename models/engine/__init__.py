"""One Predictor per task kind (registered by `task_kind`), one typed result per input; see models.engine.base."""
from models.engine.base import (PREDICTORS, InputRefused, Item, Prediction, Predictor, Prepared,  # noqa: F401
                                make_predictor, predictor_class, register_predictor)
from models.engine.idc import IdcPredictor, PatchPrediction  # noqa: F401
from models.engine.malignancy import FramePrediction, MalignancyPredictor  # noqa: F401
from models.engine.subtype import SubtypePrediction, SubtypePredictor  # noqa: F401
from models.engine.serve import ServeError, load_predictor, model_path  # noqa: F401
