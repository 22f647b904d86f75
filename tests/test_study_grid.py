"""Study files: grid expansion, node addressing, the jobs they make, and every validation error."""
import io
import re
import json
from pathlib import Path

import pytest

from lynx_batch.__main__ import main as batch_main
from lynx_batch.study.grid import job_workflow, make_jobs
from lynx_batch.study.studyfile import StudyError, load_study

ROOT = Path(__file__).resolve().parents[1]
FULL_API = ROOT / "workflows" / "api" / "lynx_full_t2v_api.json"


@pytest.fixture
def folder(tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    for name in ("alice.png", "bob.jpg", "carol.webp"):
        (faces / name).write_bytes(b"photo " + name.encode())
    (faces / "notes.txt").write_text("not a photo")
    (tmp_path / "prompts.txt").write_text("# comment\nfirst prompt\n\nsecond prompt\n", encoding="utf-8")
    return tmp_path


def write(folder: Path, body: str, head: str | None = None, name: str = "study.toml") -> Path:
    head = head if head is not None else (f'workflow = "{FULL_API}"\nfaces = "faces"\nprompts = "prompts.txt"\n'
                                          "seeds = [42, 7]\n")
    path = folder / name
    path.write_text(head + body, encoding="utf-8")
    return path


def error(folder: Path, body: str, head: str | None = None) -> str:
    with pytest.raises(StudyError) as e:
        load_study(write(folder, body, head))
    return str(e.value)


def test_grid_is_the_cartesian_product_plus_named_settings(folder):
    study = load_study(write(folder, '[grid]\n"Lynx Sampler.ip_scale" = [0.8, 1.0]\n'
                                     '"11.sampler_name" = ["lynx_unipc", "uni_pc_bh2"]\n'
                                     '[[settings]]\nname = "strong id"\n"LynxSampler.cfg_id" = 3.0\n'
                                     '[[settings]]\n"Lynx Sampler.ref_scale" = 0.5\n'))
    assert [s.id for s in study.settings] == ["s00", "s01", "s02", "s03", "s04", "s05"]
    assert [s.label for s in study.settings] == [
        "ip_scale=0.8, sampler_name=lynx_unipc", "ip_scale=0.8, sampler_name=uni_pc_bh2",
        "ip_scale=1.0, sampler_name=lynx_unipc", "ip_scale=1.0, sampler_name=uni_pc_bh2",
        "strong id", "11.ref_scale=0.5"]
    assert study.settings[1].values == {"11.ip_scale": 0.8, "11.sampler_name": "uni_pc_bh2"}
    assert study.settings[4].values == {"11.cfg_id": 3.0}
    assert [s.id for s in study.subjects] == ["alice", "bob", "carol"]  # notes.txt is not a face
    assert [(p.id, p.text) for p in study.prompts] == [("p00", "first prompt"), ("p01", "second prompt")]
    assert study.name == "study" and study.repeats == 1 and study.seeds == [42, 7]

    jobs = make_jobs(study)
    assert len(jobs) == study.job_count == 6 * 3 * 2 * 2
    assert len({j.job_id for j in jobs}) == len(jobs)
    assert [j.job_id for j in jobs[:7]] == [f"s0{i}-alice-p00-seed42-r0" for i in range(6)] + ["s00-bob-p00-seed42-r0"]
    assert jobs[-1].job_id == "s05-carol-p01-seed7-r0"


def test_job_workflow_fills_the_setting_photo_prompt_and_every_seed(folder):
    study = load_study(write(folder, '[grid]\n"Lynx Sampler.ip_scale" = [0.5]\n"Lynx Video Combine.crf" = [30]\n'))
    job = next(j for j in make_jobs(study) if j.job_id == "s00-bob-p01-seed7-r0")
    wf = job_workflow(study, job, "lynx_queue/bob.jpg")
    original = json.loads(FULL_API.read_text())
    assert wf["11"]["inputs"]["ip_scale"] == 0.5 and wf["13"]["inputs"]["crf"] == 30
    assert wf["5"]["inputs"]["image"] == "lynx_queue/bob.jpg" and wf["7"]["inputs"]["text"] == "second prompt"
    assert wf["10"]["inputs"]["seed"] == wf["11"]["inputs"]["seed"] == 7  # the reference shares the seed
    assert wf["8"]["inputs"]["text"] == original["8"]["inputs"]["text"]
    changed = {(n, k) for n in wf for k in wf[n]["inputs"] if wf[n]["inputs"][k] != original[n]["inputs"][k]}
    assert changed == {("11", "ip_scale"), ("13", "crf"), ("5", "image"), ("7", "text"), ("10", "seed"),
                       ("11", "seed")}
    assert study.workflow == original  # the study's own copy is untouched


def test_repeats_csv_prompts_json_study_and_node_overrides(folder):
    (folder / "prompts.csv").write_text('prompt,negative\n"a, b",blurry\nsecond,\n', encoding="utf-8")
    study_json = folder / "study.json"
    study_json.write_text(json.dumps({
        "name": "json one", "workflow": str(FULL_API), "faces": "faces", "prompts": "prompts.csv", "seeds": [1],
        "repeats": 2, "face_node": "Face Photo", "prompt_node": "7", "negative_node": "negative prompt",
        "grid": {"Lynx Sampler.steps": [4, 8]}, "evaluators": {"facexlib_arcface": True, "frame_stride": 2}}))
    study = load_study(study_json)
    assert study.name == "json one" and study.repeats == 2
    assert (study.targets.face_node, study.targets.prompt_node, study.targets.negative_node) == ("5", "7", "8")
    assert [(p.text, p.negative) for p in study.prompts] == [("a, b", "blurry"), ("second", None)]
    jobs = make_jobs(study)
    assert len(jobs) == 2 * 3 * 2 * 1 * 2 and jobs[-1].job_id == "s01-carol-p01-seed1-r1"
    wf = job_workflow(study, jobs[0], "x.png")
    assert wf["8"]["inputs"]["text"] == "blurry"
    data = study.to_json()
    assert {"name", "study_file", "study_sha256", "settings", "subjects", "prompts", "seeds", "repeats",
            "evaluators"} <= set(data)
    assert data["evaluators"] == {"facexlib_arcface": True, "frame_stride": 2}  # passed through as given
    assert data["subjects"][0] == {"id": "alice", "face": str((folder / "faces" / "alice.png").resolve())}
    assert data["prompts"][0] == {"id": "p00", "text": "a, b", "negative": "blurry"}
    assert data["settings"][1] == {"id": "s01", "label": "steps=8", "values": {"11.steps": 8}}


def test_inline_prompts_and_a_setting_without_values(folder):
    study = load_study(write(folder, '[[settings]]\nname = "as is"\n', head=(
        f'workflow = "{FULL_API}"\nfaces = "faces"\nprompts = ["one", "two", "three"]\nseeds = 3\n')))
    assert [s.label for s in study.settings] == ["as is"] and study.settings[0].values == {}
    assert len(study.prompts) == 3 and study.seeds == [3] and study.job_count == 9


@pytest.mark.parametrize("body, expected", [
    ('[grid]\n"Lynx Sampelr.ip_scale" = [1.0]\n', r"no node has the id or title 'Lynx Sampelr'.*11 'Lynx Sampler'"),
    ('[grid]\n"Lynx Sampler.ip_scal" = [1.0]\n', r"grid.\"Lynx Sampler.ip_scal\": node 11 \(LynxSampler\) has no "
                                                  r"input 'ip_scal'; its value inputs are: .*ip_scale"),
    ('[grid]\n"CLIPTextEncode.text" = ["x"]\n', r"several nodes are CLIPTextEncode \(7, 8\)"),
    ('[grid]\n"Lynx Sampler.model" = [1]\n', r"11 \(LynxSampler\).model is connected to node 1"),
    ('[grid]\n"Lynx Sampler.seed" = [1, 2]\n', r"cannot be swept: the seeds come from 'seeds'"),
    ('[grid]\n"Positive Prompt.text" = ["x"]\n', r"cannot be swept: each job fills it in"),
    ('[grid]\n"Lynx Sampler.steps" = [4.5]\n', r"4.5 is not a whole number"),
    ('[grid]\n"Lynx Sampler.ip_scale" = ["high"]\n', r"'high' is not a number"),
    ('[grid]\n"Lynx Sampler.ip_scale" = 1.0\n', r"give a non-empty list of values, e.g. \[1.0\]"),
    ('[grid]\n"Lynx Sampler.ip_scale" = [1.0, 1.0]\n', r"listed twice"),
    ('[grid]\n"ip_scale" = [1.0]\n', r"not an address; write \"<node title or id>.<input name>\""),
    ('[grid]\n', r"the study has no settings"),
    ('', r"the study has no settings"),
    ('[grid]\n"Lynx Sampler.ip_scale" = [1.0]\n"11.ip_scale" = [2.0]\n', r"the same input as grid"),
    ('[grid]\n"Lynx Sampler.ip_scale" = [1.0]\n[[settings]]\n"11.ip_scale" = 1.0\n', r"s00 and s01 .*run the same"),
    ('[[settings]]\nname = "a"\n[[settings]]\nname = "a"\n"11.cfg" = 4.0\n', r"the same name 'a'"),
    ('[[settings]]\nname = "x"\n"11.ip_scale" = true\n', r"True is not a number"),
    ('repeats = 0\n[grid]\n"11.cfg" = [4.0]\n', r"'repeats' must be a whole number >= 1"),
    ('sedes = [1]\n[grid]\n"11.cfg" = [4.0]\n', r"unknown key\(s\) sedes"),
    ('face_node = "Nope"\n[grid]\n"11.cfg" = [4.0]\n', r"face_node: no node has the id or title 'Nope'"),
    ('evaluators = 3\n[grid]\n"11.cfg" = [4.0]\n', r"'evaluators' must be a table"),
    ('[grid]\n"11.cfg" = [4.0]\n[evaluators]\nframe_strid = 2\n', r"evaluators: unknown key\(s\) \['frame_strid'\]"),
])
def test_validation_errors_name_the_key_and_the_fix(folder, body, expected):
    msg = error(folder, body)
    assert re.search(expected, msg), msg


def test_ambiguous_title_asks_for_the_id(folder, tmp_path):
    wf = json.loads(FULL_API.read_text())
    wf["8"]["_meta"]["title"] = "Positive Prompt"
    (tmp_path / "wf.json").write_text(json.dumps(wf))
    msg = error(folder, '[grid]\n"Positive Prompt.text" = ["x"]\n',
                head=f'workflow = "wf.json"\nfaces = "faces"\nprompts = "prompts.txt"\nseeds = [1]\nprompt_node = "7"\n')
    assert "the title 'Positive Prompt' is on several nodes (7, 8); use the node id" in msg


@pytest.mark.parametrize("head, expected", [
    ('faces = "faces"\nprompts = "prompts.txt"\nseeds = [1]\n', r"'workflow' is missing"),
    ('workflow = "nope.json"\nfaces = "faces"\nprompts = "prompts.txt"\nseeds = [1]\n', r"workflow: .*nope.json does not exist"),
    ('workflow = "{wf}"\nfaces = "nofaces"\nprompts = "prompts.txt"\nseeds = [1]\n', r"faces: .*nofaces is missing"),
    ('workflow = "{wf}"\nfaces = "empty"\nprompts = "prompts.txt"\nseeds = [1]\n', r"has no image"),
    ('workflow = "{wf}"\nfaces = "dups"\nprompts = "prompts.txt"\nseeds = [1]\n',
     r"alice.jpg and alice.png give the same subject id 'alice'"),
    ('workflow = "{wf}"\nfaces = "faces"\nseeds = [1]\n', r"'prompts' is missing"),
    ('workflow = "{wf}"\nfaces = "faces"\nprompts = "seeded.csv"\nseeds = [1]\n', r"'seed' column value; seeds come"),
    ('workflow = "{wf}"\nfaces = "faces"\nprompts = ["a", "a"]\nseeds = [1]\n', r"line 2 repeats line 1"),
    ('workflow = "{wf}"\nfaces = "faces"\nprompts = "prompts.txt"\n', r"'seeds' is missing"),
    ('workflow = "{wf}"\nfaces = "faces"\nprompts = "prompts.txt"\nseeds = [1, 1]\n', r"1 is listed twice"),
    ('workflow = "{wf}"\nfaces = "faces"\nprompts = "prompts.txt"\nseeds = [-1]\n', r"-1 is not a whole number from 0"),
])
def test_input_errors(folder, head, expected):
    import re

    (folder / "empty").mkdir()
    (folder / "dups").mkdir()
    (folder / "dups" / "alice.png").write_bytes(b"x")
    (folder / "dups" / "alice.jpg").write_bytes(b"y")
    (folder / "seeded.csv").write_text("prompt,seed\nhello,3\n")
    msg = error(folder, '[grid]\n"11.cfg" = [4.0]\n', head=head.replace("{wf}", str(FULL_API)))
    assert re.search(expected, msg), msg


def test_a_ui_format_workflow_is_refused_with_the_export_hint(folder):
    ui = ROOT / "workflows" / "Lynx Full (ID and Ref adapters), photo to video.json"
    msg = error(folder, '[grid]\n"11.cfg" = [4.0]\n',
                head=f'workflow = "{ui}"\nfaces = "faces"\nprompts = "prompts.txt"\nseeds = [1]\n')
    assert "UI-format workflow; export it in API format" in msg and msg.startswith("workflow: ")


def test_plan_prints_the_grid_and_the_job_count(folder):
    path = write(folder, '[grid]\n"Lynx Sampler.ip_scale" = [0.8, 1.0]\n')
    out, err = io.StringIO(), io.StringIO()
    assert batch_main(["study", "plan", str(path), "--jobs"], out, err) == 0, err.getvalue()
    text = out.getvalue()
    assert "s00  ip_scale=0.8  [11.ip_scale=0.8]" in text and "s01  ip_scale=1.0" in text
    assert "jobs: 2 settings x 3 subjects x 2 prompts x 2 seeds x 1 repeats = 24" in text
    assert "face photo -> node 5.image, prompt -> node 7.text, negative -> node 8.text, seed -> 10.seed, 11.seed" in text
    assert text.count("-seed") == 24 and "s01-carol-p01-seed7-r0" in text

    out, err = io.StringIO(), io.StringIO()
    bad = write(folder, '[grid]\n"Lynx Sampler.nope" = [1]\n', name="bad.toml")
    assert batch_main(["study", "plan", str(bad)], out, err) == 2
    assert err.getvalue().startswith("error: grid.\"Lynx Sampler.nope\": node 11 (LynxSampler) has no input 'nope'")


def test_the_shipped_example_study_expands(tmp_path):
    text = (ROOT / "docs" / "examples" / "study_example.toml").read_text()
    text = text.replace("../../workflows", str(ROOT / "workflows"))
    (tmp_path / "study_faces").mkdir()
    (tmp_path / "study_faces" / "alice.png").write_bytes(b"x")
    (tmp_path / "study.toml").write_text(text)
    study = load_study(tmp_path / "study.toml")
    assert len(study.settings) == 7 and study.job_count == 7 * 1 * 2 * 2
    assert study.settings[-1].values == {"11.cfg_id": 3.0, "11.ref_scale": 0.8}
