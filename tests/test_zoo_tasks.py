"""tools/zoo_tasks.py (`zoo.py --tasks`): the input retry, and a section that leaves the rest of docs/ZOO.md alone."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import zoo  # noqa: E402
import zoo_tasks  # noqa: E402


def test_video_model_is_tried_at_the_next_input_only_when_it_does_not_run(monkeypatch):
    tried = []

    def fake_run_model(name, ratio, timeout, threads, onnx=True, extra=()):
        tried.append(extra)
        if len(tried) == 1:
            return {"model": name, "status": "refused", "why": f"error: the model {zoo_tasks.NOT_RUNNING} (1, 3)"}
        return {"model": name, "status": "refused", "why": "error: neither torch.fx nor torch.export can trace it"}

    monkeypatch.setattr(zoo_tasks, "run_model", fake_run_model)
    rec = zoo_tasks.run_task_model("mvit_v2_s", "video", 0.3, 10, None, onnx=True)
    assert tried == [("--input-shape", "1,3,8,64,64"), ("--input-shape", "1,3,16,112,112")]  # stops at a real refusal
    assert rec["input"] == "1x3x16x112x112" and rec["task"] == "video" and not rec["cnn"]
    tried.clear()
    zoo_tasks.run_task_model("raft_small", "optical_flow", 0.3, 10, None, onnx=True)
    assert tried[0] == ("--input-shape", zoo_tasks.IMAGE, "--input-shape", zoo_tasks.IMAGE)  # two images


def test_tasks_section_is_spliced_in_and_kept_by_the_classification_rewrite():
    doc = "# classification\n\ntable\n\n" + zoo.TIMM_BEGIN + "\ntimm\n" + zoo.TIMM_END + "\n\nafter timm\n"
    rec = {"model": "ssd300_vgg16", "task": "detection", "input": "1x3x128x128", "cnn": True, "status": "refused",
           "why": "error: neither torch.fx nor torch.export can trace the top level of SSD"}
    mach = {"cpu": "c", "cores": "2", "torch": "t", "torchvision": "v"}
    section = zoo_tasks.render_tasks([rec], [], mach, 0.3, 60)
    once = zoo_tasks.splice_tasks(doc, section)
    assert once.startswith(doc.rstrip("\n")) and "after timm" in once
    assert "| ssd300_vgg16 | detection | 1x3x128x128 | - |" in once and "| neither torch.fx" in once
    assert zoo_tasks.splice_tasks(once, section) == once  # replaced, not appended twice
    kept = zoo.kept_sections(once)
    assert kept.startswith(zoo.TIMM_BEGIN) and zoo_tasks.tasks_section(once) in kept
