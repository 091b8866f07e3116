"""Functions for the tiny lmms-eval test tasks (referenced from the YAML files with !function)."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    answer = results[0].strip().lower()
    return {"exact_match": float(answer == doc["answer"]), "answer_chars": float(len(answer))}


def doc_to_video(doc):
    """As lmms-eval's video tasks do: the path of the document's video file (here relative to the
    folder lmms-eval runs in, where the test writes the videos)."""
    import os

    return [os.path.join(os.getcwd(), doc["video"])]
