"""What the lmms-eval plugin tests share: the documents, requests as lmms-eval builds them, and the plugin
built the way lmms-eval builds it (`--model dymu --model_args ...`) over one task of those documents."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import load_image  # noqa: E402

DOC_IMAGES = ("skimage_chelsea_cat.png", "synthetic_blank_white.png", "darknet_dog_bicycle_truck.jpg")


def plugin_documents() -> list[dict]:
    return [{"image": load_image(name)} for name in DOC_IMAGES]


def instance(request_type, arguments, doc_id, task="t"):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=request_type, arguments=arguments, idx=0,
                    metadata={"task": task, "doc_id": doc_id, "repeats": 1})


def plugin(model_dir, docs, **args):
    from dymu.integrations.lmms_eval import DyMU

    lm = DyMU(pretrained=str(model_dir), **args)
    lm.task_dict = {"t": {"test": docs}}
    return lm
