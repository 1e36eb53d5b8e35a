"""The benchmark scripts run end to end on small inputs and write the tables they promise."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from kallm.core.layers import KANFeedForward
from kallm.testing.models import tiny_model
from kallm.testing.processes import load_script
from kallm.testing.tokenizers import make_tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts" / "bench"

def fit_bench_inputs(tmp_path):
    """A saved tiny Llama with its tokenizer, a text to score, and where the tables go."""
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("The river flows past the old mill and under the stone bridge. " * 20)
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    return folder, text, out_json, out_md


def first_conversations(data_dir, tmp_path, count: int = 8):
    """A chat file of the first ``count`` HH-RLHF conversations of the data folder."""
    chat = tmp_path / "chat.jsonl"
    lines = (data_dir / "chat/hh_rlhf_helpful/test.jsonl").read_text(encoding="utf-8").splitlines(True)
    chat.write_text("".join(lines[:count]))
    return chat


def test_bench_fit_init_scores_every_arm(tmp_path):
    folder, text, out_json, out_md = fit_bench_inputs(tmp_path)
    code = load_script("bench_fit_init").main([
        "--model", str(folder), "--text", str(text), "--max-tokens", "200", "--max-length", "64", "--last-n", "1",
        "--sizes", "16", "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0
    result = json.loads(out_json.read_text())
    arms = {arm["arm"]: arm for arm in result["arms"]}
    assert list(arms) == ["original", "random init", "fit init", "fit init, size 16"]
    assert arms["original"]["ratio_to_original"] == 1.0
    # a random tiny model scores near chance whatever its feedforwards, so only the bookkeeping is checked
    # here; tests/test_fit.py checks what the fit achieves
    assert all(arm["tokens"] == 200 and arm["perplexity"] > 1 for arm in arms.values())
    assert arms["fit init, size 16"]["feedforward_parameters"] < arms["fit init"]["feedforward_parameters"]
    assert set(arms["fit init"]["fit_relative_error"]) == {"2"}
    assert "| fit init, size 16 |" in out_md.read_text()


def test_bench_fit_init_per_block_table(tmp_path):
    folder, text, out_json, out_md = fit_bench_inputs(tmp_path)
    code = load_script("bench_fit_init").main([
        "--model", str(folder), "--text", str(text), "--max-tokens", "100", "--max-length", "64", "--last-n", "2",
        "--per-block", "--per-block-tokens", "100", "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0
    result = json.loads(out_json.read_text())
    table = result["per_block"]
    first, last = result["retrofit"]["blocks"]
    assert [row["blocks"] for row in table["rows"]] == [[first], [last], [first, last]]
    fit_arm = next(arm for arm in result["arms"] if arm["arm"] == "fit init")
    assert table["original"] == pytest.approx(fit_arm["perplexity"] / fit_arm["ratio_to_original"], rel=0.05)
    for row in table["rows"]:
        # the fit beats deletion on the rows it was fitted to (deletion scores 1 or more there)
        assert all(0 <= error < 1 for error in row["calibration_error"])
        assert len(row["scored_text_error"]) == len(row["blocks"])
        assert all(row[f"perplexity_{name}"] > 1 for name in ("fitted", "deleted", "linear"))
    assert f"| {first}, {last} |" in out_md.read_text()


def test_bench_layers_writes_its_table(tmp_path):
    out_json, out_md = tmp_path / "layers.json", tmp_path / "layers.md"
    code = load_script("bench_layers").main(["--tokens", "64", "--decode-tokens", "1", "8", "--repeats", "1", "--warmup", "0", "--threads", "1",
                                              "--json", str(out_json), "--markdown", str(out_md)])
    assert code in (0, None)
    report = json.loads(out_json.read_text())
    arms = ("kan", "kan_base_silu", "kan_gated", "llama_mlp", "textbook")
    assert [(r["tokens"], r["model"]) for r in report["decode_rows"]] == [(n, m) for n in (1, 8) for m in arms]
    assert all(r["forward_us"] > 0 for r in report["decode_rows"])
    assert [r["model"] for r in report["rows"]] == list(arms)
    # every KAN arm the widest of its form within half the MLP's parameters
    sizes, budget = report["kan_intermediate_sizes"], report["rows"][3]["parameters"] // 2
    for arm, options in (("kan", {}), ("kan_base_silu", {"base": "silu"}), ("kan_gated", {"gated": True})):
        assert next(r["parameters"] for r in report["rows"] if r["model"] == arm) <= budget
        assert KANFeedForward.count_parameters(576, sizes[arm] + 1, "cheby2", 2, **options) > budget
    assert sizes["kan"] == report["kan_intermediate_size"] > sizes["kan_base_silu"]
    assert "| cpu | 1 | float32 | 8 | kan |" in out_md.read_text()
    assert "| cpu | 1 | float32 | 64 | kan_gated |" in out_md.read_text()


def test_bench_layers_gpu_rows_count_the_gemm_traffic_and_need_a_gpu(monkeypatch):
    bench = load_script("bench_layers")
    # one 10 -> 20 layer with 400 weights at 2 bytes: 3 * N * (in + out) activations, 3 * weights
    assert bench.gemm_traffic_bytes([(10, 20, 400)], tokens=100, element_size=2) == 2 * (3 * 100 * 30 + 3 * 400)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda needs a CUDA GPU"):
        bench.main(["--device", "cuda", "--json", "", "--markdown", ""])


def test_gpu_train_step_needs_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        load_script("gpu_train_step").main([])


def test_bench_convert_measures_exact_and_lossy_conversions():
    bench = load_script("bench_convert")
    exact = bench.exact_rows(["cheby2", "hermite"], degrees=(3,))
    assert [row["source"] for row in exact] == ["cheby2", "hermite"]
    assert all(row["max_logit_difference"] < 1e-4 * row["logit_scale"] for row in exact)
    assert all(row["max_logit_difference_float64"] < 1e-12 for row in exact)
    lossy = bench.lossy_rows(bench.LOSSY[:1])
    assert lossy[0]["conversion"] == "cheby2 3 -> legendre 2" and not lossy[0]["exact"]
    assert lossy[0]["relative_error"] > 1e-3 and lossy[0]["max_logit_difference"] > 1e-3
    table = bench.format_tables(exact, lossy)
    assert "| hermite |" in table and "| cheby2 3 -> legendre 2 | no |" in table


@pytest.mark.integration  # a whole healing run per arm, ~35 s
def test_bench_heal_runs_its_arms_and_writes_table_json_and_curve(tmp_path, data_dir, monkeypatch):
    import shutil

    bench = load_script("bench_heal")
    folder, _, _, _ = fit_bench_inputs(tmp_path)
    data = heal_data_folder(tmp_path, data_dir)
    (data / "bbh/bbh").mkdir(parents=True)
    for task in bench.BBH_TASKS.split(","):
        shutil.copy(data_dir / "bbh/bbh" / f"{task}.json", data / "bbh/bbh")
    monkeypatch.setenv("KALLM_DATA_DIR", str(data))
    output = tmp_path / "out" / "bench_heal"
    code = bench.main(["--model", str(folder), "--arms", "original,kan-fit+heal,kan-fit+train", "--minutes", "0.06",
                       "--eval-every", "0.03", "--score-tokens", "300", "--last-n", "1", "--bbh-limit", "1",
                       "--chat-limit", "2", "--threads", "1", "--work", str(tmp_path / "work"),
                       "--output", str(output)])
    assert code == 0
    results = json.loads(output.with_suffix(".json").read_text())["arms"]
    assert [r["arm"] for r in results] == ["original", "kan-fit+heal", "kan-fit+train"]
    for r in results:
        assert r["curve"][0]["minutes"] == 0 and len(r["curve"]) >= 2 and r["peak_memory_mib"] > 0
    healed = results[1]
    assert set(healed["blocks"]) == {"before", "after", "alone"} and healed["steps"] >= 1
    table = output.with_suffix(".md").read_text()
    assert "| kan-fit+heal |" in table and "| kan-fit+train |" in table and "| block |" in table
    assert output.with_suffix(".png").stat().st_size > 1000


def test_bench_mini_model_compares_full_and_mini_models(tmp_path):
    import torch

    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "dev"):
        rows = [{"text": f"{split} text number {i}", "label": i % 2} for i in range(8)]
        (data / f"{split}.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    code = load_script("bench_mini_model").main([
        "--model", str(folder), "--data", str(data), "--num-blocks", "1", "--batch-size", "2", "--steps", "1",
        "--eval-texts", "4", "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert [row["model"] for row in rows] == ["full", "1 blocks", "1 blocks, trimmed vocabulary"]
    full, blocks, trimmed = rows
    assert full["parameters"] > blocks["parameters"] > trimmed["parameters"]
    assert trimmed["vocabulary"] < blocks["vocabulary"]
    # on texts of the kept vocabulary: the same tokens, and no worse a language model (the same logits, fewer rivals)
    assert trimmed["train_tokens_per_text"] == blocks["train_tokens_per_text"]
    assert trimmed["train_bits_per_character"] <= blocks["train_bits_per_character"] + 1e-6
    assert all(torch.isfinite(torch.tensor(row["seconds_per_step"])) for row in rows)
    assert "| full |" in out_md.read_text()


def test_bench_inference_measures_every_arm(tmp_path):
    folder, text, out_json, out_md = fit_bench_inputs(tmp_path)
    code = load_script("bench_inference").main([
        "--model", str(folder), "--last-n", "1", "--prefill", "16", "--new-tokens", "3", "--batch", "1", "2",
        "--repeats", "2", "--perplexity-tokens", "100", "--text", str(text), "--threads", "1",
        "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0
    rows = {row["arm"]: row for row in json.loads(out_json.read_text())["rows"]}
    assert list(rows) == ["original", "last-1", "all-3", "original int8", "last-1 int8", "all-3 int8"]
    assert rows["original"]["decode_b1_ratio"] == 1.0 and rows["original"]["prefill_ratio"] == 1.0
    for row in rows.values():
        assert len(row["rounds"]) == 2 and row["decode_b2_tokens_per_s"] > 0 and row["perplexity"] > 1
    assert rows["all-3"]["parameters"] < rows["last-1"]["parameters"] < rows["original"]["parameters"]
    assert rows["all-3 int8"]["weight_bytes"] < rows["all-3"]["weight_bytes"]
    assert "| last-1 int8 |" in out_md.read_text()


def test_bench_int8_quality_compares_each_quantized_arm_with_its_model(tmp_path):
    pytest.importorskip("torchao", reason="torchao is not installed (pip install 'kallm[quant]')")
    folder, text, out_json, out_md = fit_bench_inputs(tmp_path)
    code = load_script("bench_int8_quality").main([
        "--model", str(folder), "--text", str(text), "--perplexity-tokens", "100", "--last-n", "1", "--threads", "1",
        "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0
    rows = {row["arm"]: row for row in json.loads(out_json.read_text())["rows"]}
    assert list(rows) == ["original", "original int8", "fit last-1", "fit last-1 int8 kan", "fit last-1 int8 all",
                          "fit last-1 int8 kan, one scale per row"]
    assert rows["original"]["relative_change"] is None and rows["original int8"]["compared_with"] == "original"
    kan = rows["fit last-1 int8 kan"]
    assert kan["compared_with"] == "fit last-1"
    assert kan["relative_change"] == pytest.approx(kan["perplexity"] / rows["fit last-1"]["perplexity"] - 1)
    assert all(row["perplexity"] > 1 for row in rows.values())
    assert "| fit last-1 int8 all |" in out_md.read_text()


def test_bench_adapters_trains_both_adapter_types_and_writes_its_tables(tmp_path, data_dir):
    folder, _, out_json, out_md = fit_bench_inputs(tmp_path)
    chat = first_conversations(data_dir, tmp_path)
    code = load_script("bench_adapters").main([
        "--model", str(folder), "--train-data", str(chat), "--eval-data", str(chat), "--eval-limit", "4",
        "--last-blocks", "2", "--lora-rank", "4", "--kan-rank", "4", "--steps", "2", "--batch-size", "2",
        "--max-length", "64", "--lrs", "1e-3", "1e-2", "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0
    report = json.loads(out_json.read_text())
    assert [(r["adapter"], r["lr"]) for r in report["runs"]] == [("lora", 1e-3), ("kan", 1e-3), ("lora", 1e-2),
                                                                  ("kan", 1e-2)]
    lora, kan = report["runs"][:2]
    # attention of the last 2 blocks (q, o: 32 -> 32; k, v: 32 -> 16), rank 4; the KAN layer adds 4 * (2 * 4 + 1 + 2)
    assert lora["trainable_parameters"] == 2 * 4 * (2 * 64 + 2 * 48)
    assert kan["trainable_parameters"] == lora["trainable_parameters"] + 2 * 4 * 4 * 11
    assert all(r["chat_loss"] > 0 and r["tokens"] == report["runs"][0]["tokens"] for r in report["runs"])
    assert [b["adapter"] for b in report["best"]] == ["lora", "kan"]
    table = out_md.read_text()
    assert "| kan | 4 |" in table and "| lora | " in table and "Without an adapter" in table


def test_reports_name_data_by_kallm_data_dir_not_by_this_machines_folders(tmp_path, monkeypatch):
    data = tmp_path / "shared" / "data"
    data.mkdir(parents=True)
    monkeypatch.setenv("KALLM_DATA_DIR", str(data))
    report = load_script("skeleton")
    report.write_report({"data": str(data / "chat" / "test.jsonl")}, f"data: {data}/text.raw\n",
                        str(tmp_path / "r.json"), str(tmp_path / "r.md"))
    assert json.loads((tmp_path / "r.json").read_text()) == {"data": "${KALLM_DATA_DIR}/chat/test.jsonl"}
    assert (tmp_path / "r.md").read_text() == "data: ${KALLM_DATA_DIR}/text.raw\n"


def test_every_benchmark_lives_in_scripts_bench_and_stands_on_the_skeleton():
    assert sorted(path.name for path in (REPO / "scripts").glob("*.py")) == []
    benchmarks = sorted(path for path in SCRIPTS.glob("*.py") if path.name != "skeleton.py")
    assert len(benchmarks) == 15
    for path in benchmarks:
        text = path.read_text(encoding="utf-8")
        assert "from skeleton import" in text, path.name
        # the data folder is resolved in one place (kallm.data.folder, through the skeleton), never by a script
        assert not re.search(r"environ\W.*KALLM_DATA_DIR", text) and "sys.path" not in text, path.name


def test_reports_go_to_docs_results_where_the_guides_link_them(monkeypatch):
    monkeypatch.setenv("KALLM_DATA_DIR", str(REPO))  # any folder: the defaults do not depend on it
    for name in ("bench_heal", "bench_block_ceiling", "diagnose_kan_learning"):
        output = load_script(name).parse([]).output
        assert output == str(REPO / "docs" / "results" / name)
        assert Path(f"{output}.md").is_file() and Path(f"{output}.json").is_file()
    skeleton = load_script("skeleton")
    parser = skeleton.argument_parser("A benchmark.\n\nMore.")
    skeleton.add_report_flags(parser, "bench_layers")
    args = parser.parse_args([])
    assert (args.json, args.markdown) == tuple(str(REPO / "docs" / "results" / f"bench_layers.{kind}")
                                               for kind in ("json", "md"))
    assert Path(args.json).is_file() and Path(args.markdown).is_file()


def test_every_relative_link_of_the_readme_and_the_guides_resolves():
    broken = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text(encoding="utf-8")):
            if not target.startswith(("http://", "https://", "mailto:")) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert broken == []


@pytest.mark.parametrize("value", [None, "missing"])
def test_a_benchmark_without_its_data_exits_with_one_line_naming_kallm_data_dir(value, tmp_path, monkeypatch):
    if value is None:
        monkeypatch.delenv("KALLM_DATA_DIR", raising=False)
    else:
        monkeypatch.setenv("KALLM_DATA_DIR", str(tmp_path / value))
    output = tmp_path / "out" / "ceiling"
    with pytest.raises(SystemExit) as exit_:
        load_script("bench_block_ceiling").main(["--model", "not-loaded", "--output", str(output)])
    message = str(exit_.value.code)
    assert "$KALLM_DATA_DIR" in message and "\n" not in message
    assert ("is not set" if value is None else "names no folder") in message
    assert not (tmp_path / "out").exists()


def test_chat_benchmarks_refuse_a_data_folder_that_does_not_exist(tmp_path, monkeypatch, capsys):
    # a KALLM_DATA_DIR naming no folder gives no default paths into it: the run is refused before any training
    monkeypatch.setenv("KALLM_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(SystemExit):
        load_script("bench_finetune").parse_args([])
    assert "set KALLM_DATA_DIR or pass --train-data and --eval-data" in capsys.readouterr().err


def test_write_report_makes_missing_folders_and_an_empty_output_prefix_writes_nothing(tmp_path, monkeypatch):
    skeleton = load_script("skeleton")
    skeleton.write_report({"rows": [1]}, "| a |\n", str(tmp_path / "a" / "r.json"), str(tmp_path / "b" / "r.md"))
    assert json.loads((tmp_path / "a" / "r.json").read_text()) == {"rows": [1]}
    assert (tmp_path / "b" / "r.md").read_text() == "| a |\n"
    monkeypatch.chdir(tmp_path / "a")
    skeleton.write_report_at("", {"rows": [2]}, "| b |\n")
    assert sorted(path.name for path in (tmp_path / "a").iterdir()) == ["r.json"]


@pytest.mark.integration  # a training process per arm, ~35 s
def test_bench_finetune_trains_each_arm_in_its_own_process_and_writes_its_table(tmp_path, data_dir):
    folder, text, out_json, out_md = fit_bench_inputs(tmp_path)
    chat = first_conversations(data_dir, tmp_path)
    code = load_script("bench_finetune").main([
        "--model", str(folder), "--arms", "untouched,glu-last5,lora-matched,full-mlp", "--last-blocks", "2",
        "--train-data", str(chat), "--eval-data", str(chat), "--eval-limit", "4", "--train-limit", "8",
        "--text", str(text), "--perplexity-tokens", "100", "--bbh-dir", str(data_dir / "bbh/bbh"),
        "--bbh-tasks", "navigate", "--bbh-limit", "2", "--steps", "2", "--batch-size", "2", "--max-length", "64",
        "--lrs", "1e-3", "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0
    runs = {row["arm"]: row for row in json.loads(out_json.read_text())["runs"]}
    assert list(runs) == ["untouched", "glu-last5", "lora-matched", "full-mlp"]
    # tiny Llama: hidden 32, intermediate 64; cheby2 degree 2 gives each channel's function 2 + 2 parameters
    functions = 2 * (2 * 64 * 4)
    assert runs["glu-last5"]["trainable_parameters"] == functions
    per_rank = 2 * 3 * (32 + 64)  # gate, up, down of 2 blocks
    assert runs["lora-matched"]["trainable_parameters"] == round(functions / per_rank) * per_rank
    assert runs["full-mlp"]["trainable_parameters"] == 2 * 3 * 32 * 64 + functions
    assert runs["untouched"]["trainable_parameters"] == 0 and runs["untouched"]["seconds_per_step"] is None
    for row in runs.values():
        assert row["chat_loss"] > 0 and row["perplexity"] > 1 and 0 <= row["bbh"] <= 1 and row["peak_rss_mb"] > 0
    assert "| glu-last5 | 0.001 | 1,024 |" in out_md.read_text()


def test_bench_finetune_scores_held_out_rows_of_the_training_file_past_those_trained_on(tmp_path, capsys):
    bench = load_script("bench_finetune")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(f'{{"row": {i}}}\n' for i in range(10)))
    args = bench.parse_args(["--train-data", str(train), "--eval-data", str(train), "--train-limit", "4",
                             "--held-out-from", "6", "--eval-limit", "3"])
    held_out = bench.held_out_data(args, tmp_path)
    assert Path(held_out).read_text().splitlines() == ['{"row": 6}', '{"row": 7}', '{"row": 8}']
    with pytest.raises(SystemExit):
        bench.parse_args(["--train-data", str(train), "--eval-data", str(train), "--train-limit", "4",
                          "--held-out-from", "3"])
    assert "would score conversations trained on" in capsys.readouterr().err


def heal_data_folder(tmp_path, data_dir):
    """A data folder of the healing texts (cut short) that bench_heal and bench_block_ceiling read."""
    data = tmp_path / "data"
    for name in ("text/wikitext2/wiki.test.raw", "text/tinyshakespeare/input.txt"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_text((data_dir / name).read_text(encoding="utf-8")[:3000])
    for name in ("chat/oasst_en100/all_paths.jsonl", "chat/hh_rlhf_helpful/test.jsonl"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_text("".join((data_dir / name).read_text(encoding="utf-8").splitlines(True)[:6]))
    return data


def test_bench_block_ceiling_fits_and_trains_each_form_block_locally(tmp_path, data_dir, monkeypatch):
    folder, _, _, _ = fit_bench_inputs(tmp_path)
    monkeypatch.setenv("KALLM_DATA_DIR", str(heal_data_folder(tmp_path, data_dir)))
    output = tmp_path / "ceiling"
    code = load_script("bench_block_ceiling").main([
        "--model", str(folder), "--blocks", "1,2", "--forms", "kan,gated", "--steps", "4", "--eval-every", "2",
        "--batch", "16", "--train-tokens", "600", "--score-tokens", "200", "--lr-scales", "base=0.1",
        "--output", str(output)])
    assert code == 0
    results = json.loads(output.with_suffix(".json").read_text())["results"]
    assert [(r["block"], r["form"]) for r in results] == [(1, "kan"), (1, "gated"), (2, "kan"), (2, "gated")]
    for r in results:
        assert [p["step"] for p in r["curve"]] == [0, 2, 4]
        assert all(0 <= p["train"] < 10 and 0 <= p["held_out"] < 10 for p in r["curve"])
        assert r["parameters"] <= r["mlp_parameters"] * (0.5 if r["form"] == "kan" else 1.0)
    gated = results[1]  # fit init starts the gated form at most of the MLP: far below a random start's error of ~1
    assert gated["curve"][0]["train"] < 0.5
    table = output.with_suffix(".md").read_text()
    assert "| 2 | gated |" in table and "--lr-scales base=0.1" in table


@pytest.mark.parametrize("text", ["weights=0.1", "base=-1", "base", "base=slow", "base=nan"])
def test_bench_block_ceiling_refuses_bad_learning_rate_scales_while_reading_its_arguments(text, capsys):
    bench = load_script("bench_block_ceiling")
    assert bench.parse(["--lr-scales", "base=0.1, coefficients=2"]).lr_scales == {"base": 0.1, "coefficients": 2.0}
    with pytest.raises(SystemExit):
        bench.parse(["--lr-scales", text])
    assert "argument --lr-scales: takes ROLE=SCALE pairs such as base=0.1,coefficients=2" in capsys.readouterr().err


def test_diagnose_kan_learning_reports_per_block_numbers_for_each_arm(tmp_path, monkeypatch):
    import yaml

    from kallm.recipes.sweep import load_sweep

    folder, _, _, _ = fit_bench_inputs(tmp_path)
    rows = [{"text": f"the {['ball', 'bank'][i % 2]} news {i}", "label": i % 2} for i in range(24)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny", "model": str(folder), "out": str(tmp_path / "out"), "shrink": {"num_blocks": 2},
        "data": {"train": str(tmp_path / "rows.jsonl"), "dev": str(tmp_path / "rows.jsonl")},
        "train": {"steps": 4, "batch_size": 4, "max_length": 16, "learning_rate": 1e-3},
        "arms": {"fully-linear-restart": {"kind": "linear", "last_n": 2},
                 "fully-kan-cheby2-d2": {"basis": "cheby2", "degree": 2, "last_n": 2}}}))
    load_sweep(config)
    output = tmp_path / "diagnosis"
    code = load_script("diagnose_kan_learning").main(["--config", str(config), "--steps", "4", "--every", "2",
                                                     "--output", str(output)])
    assert code == 0
    results = {r["arm"]: r for r in json.loads(output.with_suffix(".json").read_text())["results"]}
    assert set(results) == {"fully-linear-restart", "fully-kan-cheby2-d2"}
    for arm, result in results.items():
        assert [p["step"] for p in result["points"]] == [0, 2, 4]
        for point in result["points"]:
            assert [row["block"] for row in point["blocks"]] == [0, 1]
            for row in point["blocks"]:
                assert row["in"] > 0 and row["out"] > 0 and 0 <= row["token_spread"] <= 1
                assert ("saturated" in row) == (arm == "fully-kan-cheby2-d2")
                assert (row["grad"] is None) == (point["step"] == 0)
        assert all(row["update"] > 0 for row in result["points"][-1]["blocks"])
    assert "| fully-kan-cheby2-d2 | 4 |" in output.with_suffix(".md").read_text()
