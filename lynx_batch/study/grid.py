"""The settings grid: addressing node inputs, expanding the grid, and the jobs it makes.

An address is ``<node>.<input>``: the node by id ("11"), by title ("Lynx Sampler") or, when only
one node has it, by class type ("LynxSampler"); the input by name ("ip_scale"). Everything is
split at the last dot, so titles may contain dots.
"""
import copy
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from ..inputs import Job
from ..workflow import Targets, apply_job, nid_key
from .errors import StudyError

if TYPE_CHECKING:
    from .studyfile import PromptItem, Study, Subject


class GridError(StudyError):
    """A grid, settings or node entry is wrong; the message names it and the fix."""


@dataclass(frozen=True)
class Setting:
    id: str
    label: str
    values: dict[str, Any] = field(default_factory=dict)  # "<node id>.<input>" -> value


@dataclass(frozen=True)
class StudyJob:
    job_id: str
    setting: Setting
    subject: "Subject"
    prompt: "PromptItem"
    seed: int
    repeat: int


def _titles(workflow: dict[str, Any]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for nid in sorted(workflow, key=nid_key):
        title = workflow[nid].get("_meta", {}).get("title")
        if isinstance(title, str):
            found.setdefault(title, []).append(nid)
    return found


def resolve_node(workflow: dict[str, Any], ref: str, where: str) -> str:
    """The node id that ``ref`` (an id, a title or a class type) names; GridError otherwise."""
    ref = ref.strip()
    if ref in workflow:
        return ref
    titles = _titles(workflow)
    for match in (lambda t: t == ref, lambda t: t.lower() == ref.lower()):
        ids = [nid for t, nids in titles.items() if match(t) for nid in nids]
        if len(ids) == 1:
            return ids[0]
        if len(ids) > 1:
            raise GridError(f"{where}: the title '{ref}' is on several nodes ({', '.join(ids)}); use the node id "
                            f"instead, e.g. '{ids[0]}'")
    by_class = sorted((nid for nid, n in workflow.items() if n.get("class_type") == ref), key=nid_key)
    if len(by_class) == 1:
        return by_class[0]
    if len(by_class) > 1:
        raise GridError(f"{where}: several nodes are {ref} ({', '.join(by_class)}); use a node id or title")
    known = ", ".join(f"{nid} '{workflow[nid].get('_meta', {}).get('title', workflow[nid].get('class_type'))}'"
                      for nid in sorted(workflow, key=nid_key))
    raise GridError(f"{where}: no node has the id or title '{ref}'; the workflow's nodes are: {known}")


def resolve_address(workflow: dict[str, Any], address: str, where: str, targets: Targets) -> tuple[str, str]:
    """(node id, input name) of a ``<node>.<input>`` address that a setting may change."""
    if not isinstance(address, str) or "." not in address.strip(".") :
        raise GridError(f"{where}: '{address}' is not an address; write \"<node title or id>.<input name>\", "
                        "e.g. \"Lynx Sampler.ip_scale\" or \"11.ip_scale\"")
    node_ref, input_name = address.rsplit(".", 1)
    nid = resolve_node(workflow, node_ref, where)
    node = workflow[nid]
    inputs = node.get("inputs", {})
    label = f"node {nid} ({node.get('class_type')})"
    if input_name not in inputs:
        widgets = ", ".join(k for k, v in inputs.items() if not _is_link(workflow, v)) or "none"
        raise GridError(f"{where}: {label} has no input '{input_name}'; its value inputs are: {widgets}")
    if _is_link(workflow, inputs[input_name]):
        src = inputs[input_name][0]
        raise GridError(f"{where}: {label}.{input_name} is connected to node {src}, not a value; sweep an input "
                        f"of node {src} instead")
    if (nid, input_name) in targets.job_inputs():
        what = "the seeds come from 'seeds'" if (nid, input_name) in targets.seed_inputs else \
            "each job fills it in with its face photo or prompt"
        raise GridError(f"{where}: {label}.{input_name} cannot be swept: {what}")
    return nid, input_name


def _is_link(workflow: dict[str, Any], value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and str(value[0]) in workflow


def check_value(workflow: dict[str, Any], nid: str, input_name: str, value: Any, where: str) -> None:
    """The value must have the kind of the workflow's own value (a number for a number...)."""
    current = workflow[nid]["inputs"][input_name]
    number = (int, float)
    if isinstance(current, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(current, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif isinstance(current, float):
        ok, kind = isinstance(value, number) and not isinstance(value, bool), "a number"
    elif isinstance(current, str):
        ok, kind = isinstance(value, str), "a string"
    else:
        ok, kind = isinstance(value, (str, int, float, bool)), "a string, number or true/false"
    if not ok:
        raise GridError(f"{where}: {value!r} is not {kind} (node {nid}.{input_name} holds {current!r} in the "
                        "workflow)")


def _fmt(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def expand_settings(workflow: dict[str, Any], grid: Any, explicit: Any, targets: Targets) -> list[Setting]:
    """The grid's cartesian product (in the order written, last key fastest), then the named settings."""
    if not isinstance(grid, dict):
        raise GridError("'grid' must be a table of \"<node>.<input>\" = [values], e.g. "
                        "[grid] \"Lynx Sampler.ip_scale\" = [0.8, 1.0]")
    if not isinstance(explicit, list) or not all(isinstance(s, dict) for s in explicit):
        raise GridError("'settings' must be a list of tables: [[settings]] name = \"...\" "
                        "\"Lynx Sampler.ip_scale\" = 0.8")
    if not grid and not explicit:
        raise GridError("the study has no settings: add a [grid] table (\"Lynx Sampler.ip_scale\" = [0.8, 1.0]) "
                        "and/or [[settings]] entries; [[settings]] name = \"as is\" with no values runs the "
                        "workflow unchanged")
    axes: list[tuple[str, str, list[Any]]] = []  # (key, address as written, values)
    seen_keys: dict[str, str] = {}
    for address, values in grid.items():
        where = f"grid.\"{address}\""
        nid, input_name = resolve_address(workflow, address, where, targets)
        key = f"{nid}.{input_name}"
        if key in seen_keys:
            raise GridError(f"{where}: the same input as grid.\"{seen_keys[key]}\" (node {key}); keep one of them")
        seen_keys[key] = address
        if not isinstance(values, list) or not values:
            raise GridError(f"{where}: give a non-empty list of values, e.g. [{_fmt(workflow[nid]['inputs'][input_name])}]")
        for v in values:
            check_value(workflow, nid, input_name, v, where)
        if len({json_key(v) for v in values}) != len(values):
            raise GridError(f"{where}: a value is listed twice ({values}); list each value once")
        axes.append((key, address, values))

    short = [key.rsplit(".", 1)[1] for key, _, _ in axes]
    names = [s if short.count(s) == 1 else address for s, (_, address, _) in zip(short, axes)]
    combos: list[tuple[str, dict[str, Any]]] = []
    if axes:
        for combo in itertools.product(*(values for _, _, values in axes)):
            label = ", ".join(f"{n}={_fmt(v)}" for n, v in zip(names, combo))
            combos.append((label, {key: v for (key, _, _), v in zip(axes, combo)}))

    for i, entry in enumerate(explicit):
        where = f"settings[{i}]"
        name = entry.get("name")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise GridError(f"{where}: 'name' must be a non-empty string (got {name!r})")
        values: dict[str, Any] = {}
        for address, v in entry.items():
            if address == "name":
                continue
            w = f"{where}.\"{address}\""
            nid, input_name = resolve_address(workflow, address, w, targets)
            check_value(workflow, nid, input_name, v, w)
            key = f"{nid}.{input_name}"
            if key in values:
                raise GridError(f"{w}: node {key} is set twice in this setting; keep one")
            values[key] = v
        label = name.strip() if name else (", ".join(f"{k}={_fmt(v)}" for k, v in values.items()) or "as is")
        combos.append((label, values))

    width = max(2, len(str(len(combos) - 1)))
    settings = [Setting(f"s{i:0{width}d}", label, values) for i, (label, values) in enumerate(combos)]
    _check_distinct(settings, workflow)
    return settings


def json_key(value: Any) -> str:
    """Tell 1 from 1.0 from true: they are different values for a ComfyUI input."""
    return f"{type(value).__name__}:{value!r}"


def _check_distinct(settings: list[Setting], workflow: dict[str, Any]) -> None:
    labels: dict[str, str] = {}
    effective: dict[tuple, str] = {}
    for s in settings:
        if s.label in labels:
            raise GridError(f"settings {labels[s.label]} and {s.id} have the same name '{s.label}'; "
                            "give each [[settings]] entry its own name")
        labels[s.label] = s.id
        # What the server would really get: a setting equal to the workflow's own values is a duplicate too.
        full = tuple(sorted((k, json_key(v)) for k, v in s.values.items()
                            if json_key(workflow[k.rsplit('.', 1)[0]]["inputs"][k.rsplit('.', 1)[1]]) != json_key(v)))
        if full in effective:
            raise GridError(f"settings {effective[full]} and {s.id} ('{s.label}') run the same workflow; "
                            "remove one of them")
        effective[full] = s.id


def job_id(setting: Setting, subject: "Subject", prompt: "PromptItem", seed: int, repeat: int) -> str:
    return f"{setting.id}-{subject.id}-{prompt.id}-seed{seed}-r{repeat}"


def make_jobs(study: "Study") -> list[StudyJob]:
    """Every (setting, subject, prompt, seed, repeat). Settings vary fastest, so an unfinished study
    still holds every setting for the first subjects and prompts: the comparison is usable early."""
    jobs = []
    for repeat, seed, prompt, subject, setting in itertools.product(
            range(study.repeats), study.seeds, study.prompts, study.subjects, study.settings):
        jobs.append(StudyJob(job_id(setting, subject, prompt, seed, repeat), setting, subject, prompt, seed, repeat))
    return jobs


def job_workflow(study: "Study", job: StudyJob, face_value: str | None) -> dict[str, Any]:
    """A copy of the workflow with the job's setting, photo, prompts and seed filled in."""
    queue_job = Job(index=0, prompt=job.prompt.text, negative=job.prompt.negative, seed=job.seed,
                    face=job.subject.face)
    wf = apply_job(study.workflow, study.targets, queue_job, face_value)
    for key, value in job.setting.values.items():
        nid, input_name = key.rsplit(".", 1)
        wf[nid]["inputs"][input_name] = copy.deepcopy(value)
    return wf


def setting_inputs(settings: Iterable[Setting]) -> set[tuple[str, str]]:
    """(node id, input) of everything the settings change: a server error naming one of them is the
    job's own (a value out of range), not the workflow's."""
    return {tuple(key.rsplit(".", 1)) for s in settings for key in s.values}  # type: ignore[misc]
