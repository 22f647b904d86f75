"""The API-format workflow: loading it, and finding where each job's photo, prompts and seed go."""
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .errors import JobError, QueueError
from .inputs import Job
from .textfile import read_text

# Our node types whose inputs lead to the face photo and to the prompts.
FACE_ENCODERS = ("LynxEncodeFaceID",)
SAMPLERS = ("LynxSampler", "LynxGuider")
TEXT_ENCODERS = ("CLIPTextEncode",)


@dataclass
class Targets:
    face_node: str | None
    prompt_node: str
    negative_node: str | None
    seed_inputs: list[tuple[str, str]]

    def job_inputs(self) -> set[tuple[str, str]]:
        """(node id, input name) of every value a job changes; the rest is the same for all jobs."""
        filled = {(self.prompt_node, "text"), *self.seed_inputs}
        if self.face_node is not None:
            filled.add((self.face_node, "image"))
        if self.negative_node is not None:
            filled.add((self.negative_node, "text"))
        return filled


def load_workflow(path: Path, flag: str = "--workflow") -> dict[str, Any]:
    """Load an API-format workflow (the file written by ComfyUI's *Export (API)*)."""
    if not path.is_file():
        raise QueueError(f"{flag}: {path} does not exist")
    try:
        data = json.loads(read_text(path, flag))
    except json.JSONDecodeError as e:
        raise QueueError(f"{flag}: {path} is not valid JSON ({e})") from None
    if isinstance(data, dict) and "prompt" in data and isinstance(data["prompt"], dict):
        data = data["prompt"]  # a saved /prompt request body
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise QueueError(f"{flag}: {path} is a UI-format workflow; export it in API format "
                         "(ComfyUI menu Workflow > Export (API)) or use the files in workflows/api/")
    if not isinstance(data, dict) or not data or not all(
            isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise QueueError(f"{flag}: {path} is not an API-format workflow "
                         "(expected {node_id: {class_type, inputs}})")
    return data


def _link_source(workflow: dict[str, Any], node_id: str, input_name: str) -> str | None:
    value = workflow[node_id].get("inputs", {}).get(input_name)
    if isinstance(value, list) and len(value) == 2 and str(value[0]) in workflow:
        return str(value[0])
    return None


def _by_title(workflow: dict[str, Any], class_types: Iterable[str], words: Iterable[str]) -> list[str]:
    words = [w.lower() for w in words]
    found = []
    for nid, node in workflow.items():
        title = str(node.get("_meta", {}).get("title", "")).lower()
        if node.get("class_type") in class_types and any(w in title for w in words):
            found.append(nid)
    return found


def _check_node(workflow: dict[str, Any], node_id: str, flag: str, input_name: str) -> str:
    node_id = str(node_id)
    if node_id not in workflow:
        ids = ", ".join(sorted(workflow, key=nid_key))
        raise QueueError(f"{flag}: node {node_id} is not in the workflow (ids: {ids})")
    if input_name not in workflow[node_id].get("inputs", {}):
        raise QueueError(f"{flag}: node {node_id} ({workflow[node_id].get('class_type')}) has no '{input_name}' input")
    return node_id


def nid_key(nid: str) -> tuple[int, str]:
    return (int(nid), "") if nid.isdigit() else (1 << 30, nid)


def locate_targets(workflow: dict[str, Any], face_node: str | None = None, prompt_node: str | None = None,
                   negative_node: str | None = None, need_face: bool = True) -> Targets:
    """Find the LoadImage node of the face photo and the text nodes of the prompts.

    Order of preference: the explicit override, then the graph (the LoadImage that feeds
    LynxEncodeFaceID.image; the CLIPTextEncode nodes that feed LynxSampler/LynxGuider positive and
    negative), then node titles ("face", "positive", "negative").
    """
    samplers = sorted((nid for nid, n in workflow.items() if n.get("class_type") in SAMPLERS), key=nid_key)

    if face_node is not None:
        face = _check_node(workflow, face_node, "--face-node", "image")
    else:
        face_candidates = []
        for nid, n in workflow.items():
            if n.get("class_type") in FACE_ENCODERS:
                src = _link_source(workflow, nid, "image")
                if src and workflow[src].get("class_type") == "LoadImage":
                    face_candidates.append(src)
        face_candidates = sorted(set(face_candidates), key=nid_key)
        if not face_candidates:
            face_candidates = _by_title(workflow, ("LoadImage",), ("face",))
        if not face_candidates:
            loaders = [nid for nid, n in workflow.items() if n.get("class_type") == "LoadImage"]
            face_candidates = loaders if len(loaders) == 1 else []
        if len(face_candidates) > 1:
            raise QueueError(f"several LoadImage nodes feed a face encoder ({', '.join(face_candidates)}); "
                             "choose one with --face-node ID")
        face = face_candidates[0] if face_candidates else None
        if face is None and need_face:
            raise QueueError("no LoadImage node for the face photo was found; add one that feeds LynxEncodeFaceID, "
                             "or name it with --face-node ID")

    def text_node(override: str | None, flag: str, sampler_input: str, words: tuple[str, ...]) -> str | None:
        if override is not None:
            return _check_node(workflow, override, flag, "text")
        found = []
        for s in samplers:
            src = _link_source(workflow, s, sampler_input)
            if src and workflow[src].get("class_type") in TEXT_ENCODERS:
                found.append(src)
        found = sorted(set(found), key=nid_key)
        if not found:
            found = _by_title(workflow, TEXT_ENCODERS, words)
        if not found and sampler_input == "positive":
            # A lone text node that is not called negative is the prompt.
            negatives = set(_by_title(workflow, TEXT_ENCODERS, ("negative",)))
            rest = [nid for nid, n in workflow.items() if n.get("class_type") in TEXT_ENCODERS and nid not in negatives]
            found = rest if len(rest) == 1 else []
        if len(found) > 1:
            raise QueueError(f"several {sampler_input} prompt nodes ({', '.join(found)}); choose one with {flag} ID")
        if found and not isinstance(workflow[found[0]]["inputs"].get("text"), str):
            raise QueueError(f"the {sampler_input} prompt node {found[0]} gets its text from a link; "
                             f"choose a node with a text box with {flag} ID")
        return found[0] if found else None

    prompt = text_node(prompt_node, "--prompt-node", "positive", ("positive",))
    if prompt is None:
        raise QueueError("no prompt node was found; connect a CLIPTextEncode to LynxSampler.positive, "
                         "or name it with --prompt-node ID")
    negative = text_node(negative_node, "--negative-node", "negative", ("negative",))
    if negative == prompt:
        negative = None

    seeds = []
    for nid, n in workflow.items():
        for name in ("seed", "noise_seed"):
            if isinstance(n.get("inputs", {}).get(name), int) and not isinstance(n["inputs"][name], bool):
                seeds.append((nid, name))
    return Targets(face_node=face, prompt_node=prompt, negative_node=negative, seed_inputs=sorted(seeds))


def apply_job(workflow: dict[str, Any], targets: Targets, job: Job, face_value: str | None) -> dict[str, Any]:
    """A copy of the workflow with this job's photo, prompts and seed filled in."""
    wf = copy.deepcopy(workflow)
    if face_value is not None and targets.face_node is not None:
        wf[targets.face_node]["inputs"]["image"] = face_value
    wf[targets.prompt_node]["inputs"]["text"] = job.prompt
    if job.negative is not None:
        if targets.negative_node is None:
            raise JobError("the CSV gives a negative prompt but the workflow has no negative prompt node "
                           "(name it with --negative-node ID)")
        wf[targets.negative_node]["inputs"]["text"] = job.negative
    if job.seed is not None:
        # Every literal seed gets the job seed: LynxEncodeReference must share LynxSampler's seed.
        for nid, name in targets.seed_inputs:
            wf[nid]["inputs"][name] = job.seed
    return wf
