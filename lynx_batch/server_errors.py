"""Turn ComfyUI's error answers (/prompt node_errors, execution_error events, /history status)
into one readable line, and tell a job's own error from a workflow error that every job repeats."""
import json
from typing import Any

from .workflow import nid_key

MAX_CHOICES = 6  # a missing model's error lists every file the server has: show a few


def _node_errors(data: Any) -> dict[str, Any]:
    errors = data.get("node_errors") if isinstance(data, dict) else None
    return errors if isinstance(errors, dict) else {}


def _describe_node_error(nid: str, ctype: str, e: dict[str, Any]) -> str:
    extra = e.get("extra_info") if isinstance(e.get("extra_info"), dict) else {}
    where = f"node {nid} ({ctype})"
    name = extra.get("input_name")
    if name:
        where += f" input '{name}'"
    if e.get("type") == "value_not_in_list" and name and "received_value" in extra:
        choices = extra.get("input_config")
        options = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], list) else None
        text = f"{where}: {extra['received_value']!r} is not on the server"
        if options is not None:
            shown = ", ".join(map(str, options[:MAX_CHOICES])) + (" ..." if len(options) > MAX_CHOICES else "")
            text += f" (it has: {shown or 'nothing'})"
        return text
    text = e.get("message", "") or e.get("type", "error")
    if e.get("details"):
        text += f": {e['details']}"
    return f"{where}: {text}"


def format_prompt_error(data: Any, workflow: dict[str, Any]) -> str:
    """Make the /prompt 400 answer ({error, node_errors}) readable."""
    if not isinstance(data, dict):
        return str(data)[:500]
    err = data.get("error")
    msg = err.get("message", "") if isinstance(err, dict) else str(err or "")
    if isinstance(err, dict) and err.get("details"):
        msg += f" ({err['details']})"
    details = []
    for nid, ne in sorted(_node_errors(data).items(), key=lambda kv: nid_key(str(kv[0]))):
        if not isinstance(ne, dict):
            continue
        ctype = ne.get("class_type") or workflow.get(nid, {}).get("class_type", "?")
        for e in ne.get("errors", []):
            if isinstance(e, dict):
                details.append(_describe_node_error(str(nid), ctype, e))
    return "; ".join([m for m in [msg.strip()] if m] + details) or json.dumps(data)[:500]


def is_workflow_error(data: Any, job_inputs: set[tuple[str, str]]) -> bool:
    """True when the rejection concerns something no job changes, so every job would get it.

    ``job_inputs`` are the (node id, input name) pairs the tool fills in per job. An error that
    names one of them (or, without an input name, one of their nodes) is the job's own, e.g. a
    photo the server cannot open; anything else (a missing model file, an unknown node type, a
    bad value in a node we never touch) is the workflow's.
    """
    errors = _node_errors(data)
    if not errors:
        return isinstance(data, dict) and "error" in data
    job_nodes = {nid for nid, _ in job_inputs}
    for nid, ne in errors.items():
        for e in (ne.get("errors", []) if isinstance(ne, dict) else []):
            extra = e.get("extra_info") if isinstance(e, dict) and isinstance(e.get("extra_info"), dict) else {}
            name = extra.get("input_name")
            ours = (str(nid), name) in job_inputs if name else str(nid) in job_nodes
            if not ours:
                return True
    return False


def format_execution_error(data: dict[str, Any]) -> str:
    where = f"{data.get('node_type', '?')} (node {data.get('node_id', '?')})"
    etype = data.get("exception_type", "")
    emsg = str(data.get("exception_message", "")).strip()
    return f"{where}: {etype + ': ' if etype else ''}{emsg}"


def history_error(entry: dict[str, Any]) -> str | None:
    """The failure recorded in a /history entry's status messages, if the run failed."""
    status = entry.get("status") or {}
    for event, data in status.get("messages", []) or []:
        if event == "execution_error":
            return format_execution_error(data)
        if event == "execution_interrupted":
            return interrupted_text(data)
    if status.get("status_str") == "error":
        return "the server reports an error but gave no message"
    return None


def interrupted_text(data: dict[str, Any]) -> str:
    return f"interrupted at {data.get('node_type', '?')} (node {data.get('node_id', '?')})"


def was_interrupted(entry: dict[str, Any]) -> bool:
    messages = (entry.get("status") or {}).get("messages", []) or []
    return any(event == "execution_interrupted" for event, _ in messages)


def output_files(entry: dict[str, Any], include_temp: bool = False) -> list[dict[str, Any]]:
    """Files listed in a /history entry's ui outputs (images, videos, gifs, audio...)."""
    files = []
    for node_id in sorted(entry.get("outputs", {}), key=nid_key):
        for key, items in entry["outputs"][node_id].items():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    kind = item.get("type", "output")
                    if kind == "output" or include_temp:
                        files.append({**item, "node": node_id, "key": key})
    return files
