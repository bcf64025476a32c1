"""`elastic-ft validate CONFIG`: one line per problem, naming it and the fix, before compute."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from elastic_ft.cli import main
from tests.conftest import ROOT

CONFIG = str(ROOT / "configs" / "tiny-lora-cpu.yaml")
ARCH_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 14336, "tie_word_embeddings": False}


def _validate(*sets: str, extra: tuple[str, ...] = ()):
    args = ["validate", CONFIG] + [a for s in sets for a in ("--set", s)] + list(extra)
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_a_good_config_passes_and_shows_a_sample_as_the_model_sees_it(tmp_path,
                                                                      tiny_assets) -> None:
    done = _validate(f"model.name_or_path={tiny_assets}", f"output_dir={tmp_path / 'o'}")
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    assert f"ok    model    llama at {tiny_assets}" in lines
    assert any(x.startswith("ok    data     ") and x.endswith("alpaca, 2010 rows")
               for x in lines)
    assert "ok    data     rendered with chat template" in lines
    assert any(x.startswith("ok    storage  output_dir") for x in lines)
    sample = done.output.split("trained tokens in [[...]]:\n", 1)[1]
    assert "### Assistant:\n[[" in sample and sample.rstrip().endswith("</s>]]")
    assert not list((tmp_path / "o").glob(".elastic_ft_probe_*"))  # the probe is removed


def test_each_problem_is_one_line_with_its_fix(tmp_path, tiny_assets) -> None:
    missing = _validate("model.name_or_path=assets/tiny/nope", f"output_dir={tmp_path / 'o'}")
    assert missing.exit_code == 1
    assert ("ERROR model    model.name_or_path assets/tiny/nope not found: give a local folder "
            "that exists, or a hub name such as org/model") in missing.output.splitlines()

    qlora = _validate(f"model.name_or_path={tiny_assets}", "method.kind=qlora",
                      f"output_dir={tmp_path / 'o'}")
    assert qlora.exit_code == 1 and ("method.kind qlora needs CUDA GPUs where the workers run"
                                     in qlora.output)

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    storage = _validate(f"model.name_or_path={tiny_assets}", f"output_dir={blocker / 'out'}")
    assert storage.exit_code == 1
    assert f"ERROR storage  output_dir {blocker / 'out'} is not writable" in storage.output

    from tests.data.test_chat_templates import MISTRAL  # Mistral's real template

    tok_dir = tmp_path / "tok"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets)
    tokenizer.chat_template = MISTRAL
    tokenizer.save_pretrained(tok_dir)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}]}) + "\n")
    refused = _validate(f"model.name_or_path={tiny_assets}", f"model.tokenizer={tok_dir}",
                        f"data.paths=[{chat}]", f"output_dir={tmp_path / 'o'}")
    assert refused.exit_code == 1
    assert "none of its first rows can be trained: the chat template of" in refused.output
    assert "refuses it: Conversation roles must alternate" in refused.output


def test_memory_is_checked_against_the_given_gpus(tmp_path) -> None:
    arch = tmp_path / "llama8b"
    arch.mkdir()
    (arch / "config.json").write_text(json.dumps(ARCH_8B))
    # the check stops at the data (this architecture has no tokenizer here): memory alone
    from elastic_ft.config import load_config
    from elastic_ft.preflight import check_memory

    cfg = load_config(CONFIG, {"model.name_or_path": str(arch), "output_dir": str(tmp_path),
                               "method.kind": "full", "deepspeed.zero_stage": 0,
                               "data.seq_len": 4096, "train.precision": "bf16"})
    (bad,) = check_memory(cfg, "1xL4-24GB", "80GiB")
    assert not bad.ok and "does not fit 1 x L4" in bad.message and "try qlora + ZeRO-2" in (
        bad.message)
    (good,) = check_memory(cfg.model_copy(update={"method": cfg.method.model_copy(
        update={"kind": "lora"})}), "1xA100-80GB", "80GiB")
    assert good.ok and good.message.startswith("fits 1 x A100")


def test_plan_and_train_stop_with_one_line_not_a_traceback(tmp_path, tiny_assets) -> None:
    plan = subprocess.run([sys.executable, "-m", "elastic_ft.cli", "plan", CONFIG, "--json",
                           "--set", "model.name_or_path=assets/tiny/nope"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert plan.returncode == 1 and "Traceback" not in plan.stderr
    assert "model.name_or_path assets/tiny/nope not found" in plan.stderr
    out = tmp_path / "q"
    train = subprocess.run([sys.executable, "-m", "elastic_ft.cli", "train", CONFIG,
                            "--set", f"model.name_or_path={tiny_assets}",
                            "--set", "method.kind=qlora", "--set", f"output_dir={out}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert train.returncode == 1
    assert "pre-flight checks failed" in train.stdout and "qlora needs CUDA" in train.stdout
    assert "Started a local Ray" not in (out / "logs" / "run.log").read_text()  # no compute


def test_submit_runs_the_checks_before_anything_reaches_a_cluster(tmp_path, tiny_assets,
                                                                  monkeypatch) -> None:
    """No cluster listens at the address: the pre-flight line is all that happens."""
    from elastic_ft.core.ports import free_port

    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(main, [
        "submit", CONFIG, "--address", f"http://127.0.0.1:{free_port()}",
        "--set", f"model.name_or_path={tiny_assets}", "--set", "method.kind=qlora",
        "--set", f"output_dir={tmp_path / 'out'}"])
    assert done.exit_code == 1
    assert "qlora needs CUDA" in done.output and "Traceback" not in done.output
    assert "job " not in done.output  # nothing submitted


def test_the_cluster_at_ray_address_is_checked_for_room(tmp_path, tiny_assets, ray_local):
    import os

    address = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ADDRESS": address}
    common = [sys.executable, "-m", "elastic_ft.cli", "validate", CONFIG, "--set",
              f"model.name_or_path={tiny_assets}", "--set", f"output_dir={tmp_path}"]
    fits = subprocess.run(common, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert f"ok    cluster  {address}: room for 4 workers of {{'CPU': 1.0}}" in fits.stdout
    short = subprocess.run(common + ["--set", "workers.min=6", "--set", "workers.max=6"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert short.returncode == 1
    assert ("ERROR cluster  the cluster fits 4 workers of {'CPU': 1.0}, workers.min is 6: "
            "add nodes or lower workers.min") in short.stdout


def test_an_architecture_that_is_no_causal_lm_is_named(tmp_path) -> None:
    from elastic_ft.config import load_config
    from elastic_ft.preflight import check_model

    arch = tmp_path / "vit"
    arch.mkdir()
    (arch / "config.json").write_text(json.dumps({"model_type": "vit"}))  # an image model
    cfg = load_config(CONFIG, {"model.name_or_path": str(arch), "output_dir": str(tmp_path)})
    (finding,) = check_model(cfg, cuda_where_workers_run=False)
    assert not finding.ok and finding.message.startswith(
        "architecture 'vit' is not a causal LM transformers knows")


def test_uri_storage_is_probed_with_its_credentials(tmp_path, s3_storage) -> None:
    from elastic_ft.config import load_config
    from elastic_ft.preflight import check_storage

    cfg = load_config(CONFIG, {"output_dir": str(tmp_path), "storage_path": s3_storage})
    assert [f.ok for f in check_storage(cfg)] == [True, True]
    missing = s3_storage.replace("s3://eft-", "s3://no-such-bucket-")
    bad = check_storage(cfg.model_copy(update={"storage_path": missing}))[1]
    assert not bad.ok and "is not writable" in bad.message
