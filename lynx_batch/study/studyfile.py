"""Read a study file (TOML or JSON) into a checked, fully expanded :class:`Study`.

Every mistake is reported with the key it is under and how to fix it, before any server is
contacted: a study that runs for hours must not stop at job 300 on a typo.
"""
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import QueueError
from ..inputs import IMAGE_SUFFIXES, load_prompts
from ..textfile import read_text
from ..workflow import Targets, load_workflow, locate_targets
from .errors import StudyError
from .grid import Setting, expand_settings, resolve_node

KEYS = ("name", "workflow", "faces", "prompts", "seeds", "repeats", "grid", "settings", "evaluators",
        "face_node", "prompt_node", "negative_node")
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF  # ComfyUI's seed inputs take 64-bit unsigned values
SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Subject:
    id: str
    face: Path


@dataclass(frozen=True)
class PromptItem:
    id: str
    text: str
    negative: str | None = None


@dataclass
class Study:
    name: str
    study_file: Path
    study_sha256: str
    workflow_path: Path
    workflow: dict[str, Any]
    workflow_sha256: str
    targets: Targets
    settings: list[Setting]
    subjects: list[Subject]
    prompts: list[PromptItem]
    seeds: list[int]
    repeats: int
    evaluators: dict[str, Any] = field(default_factory=dict)

    @property
    def job_count(self) -> int:
        return len(self.settings) * len(self.subjects) * len(self.prompts) * len(self.seeds) * self.repeats

    def to_json(self) -> dict[str, Any]:
        """What study.json holds (the contract with scoring and reports)."""
        def prompt(p: PromptItem) -> dict[str, Any]:
            return {"id": p.id, "text": p.text, **({"negative": p.negative} if p.negative is not None else {})}

        return {
            "name": self.name,
            "study_file": str(self.study_file),
            "study_sha256": self.study_sha256,
            "workflow": str(self.workflow_path),
            "workflow_sha256": self.workflow_sha256,
            "targets": {"face_node": self.targets.face_node, "prompt_node": self.targets.prompt_node,
                        "negative_node": self.targets.negative_node,
                        "seed_inputs": [f"{n}.{i}" for n, i in self.targets.seed_inputs]},
            "settings": [{"id": s.id, "label": s.label, "values": dict(s.values)} for s in self.settings],
            "subjects": [{"id": s.id, "face": str(s.face)} for s in self.subjects],
            "prompts": [prompt(p) for p in self.prompts],
            "seeds": list(self.seeds),
            "repeats": self.repeats,
            "evaluators": self.evaluators,
        }


def workflow_sha256(workflow: dict[str, Any]) -> str:
    """Hash of the workflow's content (key order and spacing do not count)."""
    canon = json.dumps(workflow, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def read_study_data(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise StudyError(f"study file {path} does not exist; give a .toml or .json study file "
                         "(docs/examples/study_example.toml)")
    text = read_text(path, "study file")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise StudyError(f"study file {path} is not valid {kind} ({e})") from None
    if not isinstance(data, dict):
        raise StudyError(f"study file {path}: the top level must be a table of keys ({', '.join(KEYS)})")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise StudyError(f"study file {path}: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(KEYS)}")
    return data


def load_study(path: Path) -> Study:
    """Read, check and expand a study file; paths in it are relative to its folder."""
    path = Path(path).expanduser().resolve()
    data = read_study_data(path)
    base = path.parent

    def file_key(key: str, what: str) -> Path:
        value = data.get(key)
        if not isinstance(value, str) or not value.strip():
            raise StudyError(f"'{key}' is missing: give {what} (a path, relative to the study file)")
        return (base / Path(value).expanduser()).resolve()

    workflow_path = file_key("workflow", "the API-format workflow JSON, e.g. workflow = \"lynx_full_t2v_api.json\"")
    try:
        workflow = load_workflow(workflow_path, "workflow")
    except StudyError:
        raise
    except QueueError as e:
        raise StudyError(str(e)) from None
    subjects = _load_subjects(file_key("faces", "a folder of face photos, one subject per image"))
    prompts = _load_prompts(data.get("prompts"), base)
    seeds = _load_seeds(data.get("seeds"))
    repeats = data.get("repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise StudyError(f"'repeats' must be a whole number >= 1 (got {repeats!r})")

    nodes = {}
    for key in ("face_node", "prompt_node", "negative_node"):
        if key in data:
            if not isinstance(data[key], (str, int)) or isinstance(data[key], bool):
                raise StudyError(f"'{key}' must be a node id or title (a string), got {data[key]!r}")
            nodes[key] = resolve_node(workflow, str(data[key]), key)
    try:
        targets = locate_targets(workflow, nodes.get("face_node"), nodes.get("prompt_node"),
                                 nodes.get("negative_node"), need_face=True)
    except QueueError as e:
        # The queue tool's hints name its flags; in a study file they are keys.
        raise StudyError(str(e).replace("--face-node ID", "face_node = \"ID or title\"")
                         .replace("--prompt-node ID", "prompt_node = \"ID or title\"")
                         .replace("--negative-node ID", "negative_node = \"ID or title\"")
                         .replace("--face-node", "face_node").replace("--prompt-node", "prompt_node")
                         .replace("--negative-node", "negative_node")) from None
    if any(p.negative is not None for p in prompts) and targets.negative_node is None:
        raise StudyError("prompts: the CSV has a 'negative' column but the workflow has no negative prompt node; "
                         "name it with negative_node = \"ID or title\"")

    grid = data.get("grid", {})
    explicit = data.get("settings", [])
    settings = expand_settings(workflow, grid, explicit, targets)

    evaluators = data.get("evaluators", {})
    if not isinstance(evaluators, dict):
        raise StudyError("'evaluators' must be a table ([evaluators] with its keys below it); it is passed to scoring")
    _check_evaluators(evaluators, base)
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        raise StudyError(f"'name' must be a non-empty string (got {name!r})")
    return Study(name=name.strip(), study_file=path, study_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                 workflow_path=workflow_path, workflow=workflow, workflow_sha256=workflow_sha256(workflow),
                 targets=targets, settings=settings, subjects=subjects, prompts=prompts, seeds=seeds,
                 repeats=repeats, evaluators=evaluators)


def _check_evaluators(table: dict[str, Any], base: Path) -> None:
    """Scoring's own check of its table, now rather than after hours of videos."""
    try:
        from .evaluators import parse_config
    except ImportError:
        return  # scoring's packages (numpy...) are missing: `run --no-score` still works, scoring says why
    try:
        parse_config(table, base)
    except ValueError as e:
        raise StudyError(str(e)) from None


def subject_id(stem: str) -> str:
    """The file stem, with anything but letters, digits, '.', '_' and '-' made '-' (it names files)."""
    return SAFE_ID.sub("-", stem).strip("-.") or "face"


def _load_subjects(folder: Path) -> list[Subject]:
    if not folder.is_dir():
        what = "a file" if folder.exists() else "missing"
        raise StudyError(f"faces: {folder} is {what}; give a folder with one face photo per subject "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    photos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not photos:
        raise StudyError(f"faces: the folder {folder} has no image ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                         "put one face photo per subject in it")
    seen: dict[str, Path] = {}
    subjects = []
    for photo in photos:
        sid = subject_id(photo.stem)
        if sid.lower() in seen:
            raise StudyError(f"faces: {seen[sid.lower()].name} and {photo.name} give the same subject id '{sid}' "
                             "(the id is the file name without its extension); rename one of them")
        seen[sid.lower()] = photo
        subjects.append(Subject(sid, photo.resolve()))
    return subjects


def _load_prompts(value: Any, base: Path) -> list[PromptItem]:
    if isinstance(value, str) and value.strip():
        path = (base / Path(value).expanduser()).resolve()
        try:
            rows = load_prompts(path, "prompts")
        except QueueError as e:
            raise StudyError(str(e)) from None
        for row in rows:
            for column in ("seed", "face"):
                if column in row:
                    what = "seeds come from the study's 'seeds'" if column == "seed" else \
                        "every face runs every prompt in a study"
                    raise StudyError(f"prompts: {path} line {row['line']} has a '{column}' column value; {what}: "
                                     f"remove the '{column}' column")
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        rows = [{"prompt": v.strip(), "line": i + 1} for i, v in enumerate(value) if v.strip()]
        if len(rows) != len(value):
            raise StudyError("prompts: the list has an empty prompt; remove it")
    else:
        raise StudyError("'prompts' is missing or empty: give a prompts file (prompts = \"prompts.txt\", one "
                         "prompt per line, or a .csv with a 'prompt' column) or a list of strings")
    seen: dict[tuple[str, str | None], int] = {}
    width = max(2, len(str(len(rows) - 1)))
    items = []
    for row in rows:
        key = (row["prompt"], row.get("negative"))
        if key in seen:
            raise StudyError(f"prompts: line {row['line']} repeats line {seen[key]}; give each prompt once "
                             "(use 'repeats' or more 'seeds' for more runs of it)")
        seen[key] = row["line"]
        items.append(PromptItem(f"p{len(items):0{width}d}", row["prompt"], row.get("negative")))
    return items


def _load_seeds(value: Any) -> list[int]:
    example = "e.g. seeds = [42, 43]"
    if value is None:
        raise StudyError(f"'seeds' is missing: give a list of seeds, {example}")
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise StudyError(f"'seeds' must be a non-empty list of whole numbers, {example}")
    for s in value:
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= MAX_SEED:
            raise StudyError(f"seeds: {s!r} is not a whole number from 0 to {MAX_SEED}; {example}")
    if len(set(value)) != len(value):
        dup = next(s for s in value if value.count(s) > 1)
        raise StudyError(f"seeds: {dup} is listed twice; list each seed once (use 'repeats' to run a job again)")
    return list(value)
