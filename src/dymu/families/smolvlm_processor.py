"""The SmolVLM / Idefics3 processors without torchvision or num2words.

`SmolVLMProcessor` needs a video processor (transformers' video processors need torchvision) and
refuses to start without num2words (it spells the frame count of a video prompt). For images
neither is used: `processor_class` gives the stock processor class narrowed to (image processor,
tokenizer), whose image prompts (tile markers ``<row_i_col_j>``, ``<global-img>``, the fake image
token around each tile) and pixels are the stock ones. The image processor is the stock PIL backend
(`SmolVLMImageProcessorPil` / `Idefics3ImageProcessorPil`), which needs no torchvision.
"""

from __future__ import annotations

from .base import stock_processor

STOCK_PROCESSORS = {"smolvlm": "SmolVLMProcessor", "idefics3": "Idefics3Processor"}
_IMAGE_ONLY: dict[str, type] = {}


def processor_class(model_type: str) -> type:
    """The stock processor class of ``model_type`` (``"smolvlm"`` or ``"idefics3"``) for images only.

    Idefics3's stock processor takes images only and is returned as is. SmolVLM's gets a subclass whose
    ``__init__`` sets up what the stock one does for images (its tokens and ids) without a video
    processor and without the num2words check; transformers reads a processor's parts from its
    ``__init__`` signature, so it saves and loads as (image processor, tokenizer)."""
    import transformers
    from transformers.processing_utils import ProcessorMixin

    if model_type not in STOCK_PROCESSORS:
        raise ValueError(f"{model_type!r} is not a SmolVLM / Idefics3 model type ({', '.join(STOCK_PROCESSORS)})")
    stock = getattr(transformers, STOCK_PROCESSORS[model_type])
    if model_type == "idefics3":
        return stock
    if model_type not in _IMAGE_ONLY:
        def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None,
                     **kwargs):
            # The stock __init__'s image attributes (processing_smolvlm.py), read from the tokenizer.
            self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
            self.image_token = getattr(tokenizer, "image_token", "<image>")
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
            self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
            self.image_seq_len = image_seq_len
            self.video_token = getattr(tokenizer, "video_token", "<video>")
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

        def apply_chat_template(self, conversation, chat_template=None, **kwargs):
            # The stock one reads the video processor's frame settings first; without videos nothing else differs.
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

        _IMAGE_ONLY[model_type] = type(f"{stock.__name__}ImagesOnly", (stock,),
                                       {"__init__": __init__, "apply_chat_template": apply_chat_template})
    return _IMAGE_ONLY[model_type]


def check_processor_parts(processor) -> None:
    """Refuse, in one line, a processor this module cannot vouch for (no image processor)."""
    if not hasattr(processor, "image_processor") or not hasattr(processor, "image_seq_len"):
        raise ValueError(f"{type(processor).__name__} is not a SmolVLM / Idefics3 processor (no image processor or "
                         "image_seq_len)")


def load_smolvlm_processor(model_ref: str, model_type: str):
    """The stock processor of a SmolVLM / Idefics3 folder or hub id; where it cannot load (no torchvision
    for SmolVLM's video processor, no num2words, or a folder saved by the demo), the same processor for
    images only (`processor_class`), from the same files."""
    processor = stock_processor(model_ref)
    return processor if processor is not None else processor_class(model_type).from_pretrained(model_ref)
