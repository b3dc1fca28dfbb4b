"""Every `doc2atom` error as a new user meets it: one line on stderr, `doc2atom <command>: error: ...`, naming
the argument or file and saying what to do; exit status 2; nothing written. The inputs are checked before any
model loads, so these tests need none (a tiny one at most)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from training.cli import main
from training.compile import read_documents
from training.compile.pipeline import compile_with
from training.inputs import InputError

NEW_MODEL = ["doc2atom models prepare", "doc2atom models list"]
CHECKPOINT_HINT = "give a folder written by `doc2atom train`"
DATASET_HINT = "give a folder written by `doc2atom data build`"
GROUPS = ("models", "bank", "checkpoint", "data")  # commands with actions: `doc2atom bank info`


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """Good and bad inputs side by side."""
    (tmp_path / "doc.txt").write_text("The Eiffel Tower is in Paris. It was built in 1889.\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.md").write_text("  \n\n")
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 au lait is a drink.\n".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "text": "A fact."}\nnot json\n')
    (tmp_path / "notext.jsonl").write_text('{"id": "a", "body": "A fact."}\n')
    (tmp_path / "folder").mkdir()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "checkpoint.json").write_text("{}")  # no weights
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": str(tmp_path / "no-data"),
                                                          "out": str(tmp_path / "run")}))
    (tmp_path / "nodata.yaml").write_text("steps: 3\n")
    (tmp_path / "unknown.yaml").write_text("data: x\nstepz: 3\n")
    (tmp_path / "badweights.yaml").write_text("data: x\nweights: {answer_cee: 1}\n")
    (tmp_path / "broken.yaml").write_text("steps: [3\n")
    (tmp_path / "list.yaml").write_text("- steps\n")
    return tmp_path


def fails(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI; it must exit 2 with one error line that names the command and holds every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    command = " ".join(["doc2atom", *argv[:2 if argv[0] in GROUPS else 1]])
    assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# (command line with {tmp} for the inputs folder, what the message must say, paths that must not appear)
CASES = {
    "compile_missing_model_folder": (
        "compile {tmp}/doc.txt --out {tmp}/bank --model {tmp}/no-model",
        ["base model folder {tmp}/no-model does not exist", *NEW_MODEL], ["bank"]),
    "compile_model_is_a_file": (
        "compile {tmp}/doc.txt --out {tmp}/bank --model {tmp}/doc.txt",
        ["base model folder {tmp}/doc.txt is a file, not a folder", *NEW_MODEL], ["bank"]),
    "compile_model_folder_without_config": (
        "compile {tmp}/doc.txt --out {tmp}/bank --model {tmp}/folder",
        ["base model folder {tmp}/folder has no config.json", *NEW_MODEL], ["bank"]),
    "compile_only_empty_documents": (
        "compile {tmp}/empty.txt {tmp}/blank.md --out {tmp}/bank",
        ["nothing to compile", "empty documents are skipped"], ["bank"]),
    "compile_not_utf8": (
        "compile {tmp}/doc.txt {tmp}/latin1.txt --out {tmp}/bank",
        ["document {tmp}/latin1.txt is not UTF-8 text", "save it as UTF-8"], ["bank"]),
    "compile_missing_document": (
        "compile {tmp}/nope.txt --out {tmp}/bank", ["document {tmp}/nope.txt does not exist"], ["bank"]),
    "compile_folder_as_document": (
        "compile {tmp}/folder --out {tmp}/bank", ["document {tmp}/folder is a folder, not a file"], ["bank"]),
    "compile_jsonl_not_json": (
        "compile {tmp}/bad.jsonl --out {tmp}/bank",
        ['{tmp}/bad.jsonl: line 2 is not JSON', 'write one {"id": ..., "text": ...} per line'], ["bank"]),
    "compile_jsonl_without_text": (
        "compile {tmp}/notext.jsonl --out {tmp}/bank", ['{tmp}/notext.jsonl: line 1 has no "text"'], ["bank"]),
    "compile_out_is_a_file": (
        "compile {tmp}/doc.txt --out {tmp}/empty.txt --overwrite",
        ["bank folder {tmp}/empty.txt is a file"], []),
    "compile_out_exists": (
        "compile {tmp}/doc.txt --out {tmp}/folder",
        ["--out {tmp}/folder exists: pass --overwrite to replace it, or --add"], []),
    "compile_add_to_a_folder_that_is_no_bank": (
        "compile {tmp}/doc.txt --out {tmp}/folder --add", ["bank '{tmp}/folder': not an atom bank"], []),
    "compile_missing_checkpoint": (
        "compile {tmp}/doc.txt --out {tmp}/bank --mode amortized --checkpoint {tmp}/no-ckpt",
        ["checkpoint {tmp}/no-ckpt does not exist", CHECKPOINT_HINT], ["bank"]),
    "compile_checkpoint_in_study_mode": (
        "compile {tmp}/doc.txt --out {tmp}/bank --checkpoint {tmp}/ckpt",
        ["--checkpoint is for --mode amortized or optimize"], ["bank"]),
    "compile_missing_reranker": (
        "compile {tmp}/doc.txt --out {tmp}/bank --reranker {tmp}/no-reranker",
        ["reranker {tmp}/no-reranker does not exist", "doc2atom router train"], ["bank"]),
    "compile_reranker_in_amortized_mode": (
        "compile {tmp}/doc.txt --out {tmp}/bank --mode amortized --reranker none",
        ["--reranker is for --mode study"], ["bank"]),
    "compile_unknown_module": (
        "compile {tmp}/doc.txt --out {tmp}/bank --modules down_proj,bogus_proj",
        ["unknown module bogus_proj to adapt: choose from q_proj"], ["bank"]),
    "compile_rank_zero": (
        "compile {tmp}/doc.txt --out {tmp}/bank --rank 0", ["rank (0)", "must be at least 1"], ["bank"]),
    "compile_unknown_device": (
        "compile {tmp}/doc.txt --out {tmp}/bank --device gpu", ["--device gpu: choose auto, cpu, cuda, cuda:N"],
        ["bank"]),
    "data_build_unknown_device": (
        "data build --source synthetic --limit 2 --out {tmp}/data --device tpu", ["--device tpu: choose"], ["data"]),
    "eval_unknown_device": (
        "eval --data {tmp}/folder --out {tmp}/eval --device cuda:x", ["--device cuda:x: choose"], ["eval"]),
    "data_build_unknown_source": (
        "data build --source nosuch --out {tmp}/data",
        ["unknown source 'nosuch': use one of drop, hotpotqa, qasper_yesno, squad1, squad2, synthetic, or a SQuAD "
         ".json / .jsonl file"], ["data"]),
    "data_build_missing_source_file": (
        "data build --source {tmp}/nope.json --out {tmp}/data",
        ["source file {tmp}/nope.json does not exist"], ["data"]),
    "data_build_missing_teacher_model": (
        "data build --source synthetic --limit 2 --out {tmp}/data --model {tmp}/no-model",
        ["base model folder {tmp}/no-model does not exist", *NEW_MODEL], ["data"]),
    "data_build_out_is_a_file": (
        "data build --source synthetic --limit 2 --out {tmp}/doc.txt",
        ["output folder {tmp}/doc.txt is a file"], []),
    "eval_missing_dataset": (
        "eval --data {tmp}/no-data --out {tmp}/eval",
        ["dataset {tmp}/no-data does not exist", DATASET_HINT], ["eval"]),
    "eval_dataset_is_a_file": (
        "eval --data {tmp}/doc.txt --out {tmp}/eval",
        ["dataset {tmp}/doc.txt is a file, not a folder", DATASET_HINT], ["eval"]),
    "eval_folder_that_is_no_dataset": (
        "eval --data {tmp}/folder --out {tmp}/eval", ["dataset {tmp}/folder has no manifest.json"], ["eval"]),
    "eval_unbalanced_serve_args": (
        "eval --data {tmp}/folder --out {tmp}/eval --serve-args='\"--dtype'", ["--serve-args", "No closing"],
        ["eval"]),
    "bank_info_of_a_folder_that_is_no_bank": (
        "bank info {tmp}/folder", ["bank '{tmp}/folder': not an atom bank"], []),
    "bank_remove_from_a_missing_bank": (
        "bank remove {tmp}/no-bank doc-a", ["bank '{tmp}/no-bank': no atom bank there"], ["no-bank"]),
    "train_missing_config": (
        "train --config {tmp}/nope.yaml", ["train config {tmp}/nope.yaml does not exist"], []),
    "train_config_is_a_folder": (
        "train --config {tmp}/folder", ["train config {tmp}/folder is a folder, not a file"], []),
    "train_config_not_yaml": (
        "train --config {tmp}/broken.yaml", ["train config {tmp}/broken.yaml is not valid YAML at line 2"], []),
    "train_config_not_a_mapping": (
        "train --config {tmp}/list.yaml", ["train config {tmp}/list.yaml is not a mapping"], []),
    "train_config_without_data": (
        "train --config {tmp}/nodata.yaml", ["train config {tmp}/nodata.yaml lacks data: add `data: ...`"], []),
    "train_config_unknown_setting": (
        "train --config {tmp}/unknown.yaml", ["unknown settings stepz (known: data, model, out"], []),
    "train_config_unknown_weight": (
        "train --config {tmp}/badweights.yaml", ["unknown settings weights.answer_cee (known: answer_ce"], []),
    "train_set_without_equals": (
        "train --config {tmp}/config.yaml --set steps", ["--set steps: write KEY=VALUE, e.g. --set steps=50"],
        ["run"]),
    "train_set_unknown_key": (
        "train --config {tmp}/config.yaml --set stepz=5", ["--set stepz=5: unknown setting 'stepz'", "steps"],
        ["run"]),
    "train_set_not_an_integer": (
        "train --config {tmp}/config.yaml --set steps=many", ["--set steps=many: expected an integer"], ["run"]),
    "train_set_not_a_boolean": (
        "train --config {tmp}/config.yaml --set cache_prepared=maybe",
        ["--set cache_prepared=maybe: expected one of 1, true"], ["run"]),
    "train_set_a_nested_setting": (
        "train --config {tmp}/config.yaml --set weights=1", ["--set weights=1: set it in the config file"],
        ["run"]),
    "train_missing_dataset": (
        "train --config {tmp}/config.yaml", ["dataset {tmp}/no-data does not exist", DATASET_HINT], ["run"]),
    "checkpoint_export_missing_checkpoint": (
        "checkpoint export {tmp}/no-ckpt {tmp}/shipped",
        ["checkpoint {tmp}/no-ckpt does not exist", CHECKPOINT_HINT], ["shipped"]),
    "checkpoint_export_folder_without_weights": (
        "checkpoint export {tmp}/ckpt {tmp}/shipped",
        ["checkpoint {tmp}/ckpt has no compiler.safetensors", CHECKPOINT_HINT], ["shipped"]),
    "checkpoint_calibrate_missing_checkpoint": (
        "checkpoint calibrate {tmp}/no-ckpt --data {tmp}/folder", ["checkpoint {tmp}/no-ckpt does not exist"], []),
    "models_tiny_onto_a_file": (
        "models tiny {tmp}/doc.txt", ["output folder {tmp}/doc.txt is a file"], []),
    "models_prepare_cache_is_a_file": (
        "models prepare --cache-dir {tmp}/doc.txt", ["model cache folder {tmp}/doc.txt is a file"], []),
    "models_prepare_unknown_model": (
        "models prepare nope", ["unknown model 'nope'; packaged models: smollm2-135m-instruct"], []),
    "demo_checkpoint_in_study_mode": (
        "demo --checkpoint {tmp}/ckpt", ["--checkpoint is for --mode amortized or optimize"], []),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, inputs, capsys, monkeypatch):
    import shlex

    import training.models

    def no_model(*args, **kwargs):
        raise AssertionError("a packaged model was prepared before the input was checked")

    argv, needles, not_written = CASES[case]
    if not argv.startswith("models prepare"):  # the other cases fail on their input before preparing a model
        monkeypatch.setattr(training.models, "prepare_model", no_model)
    before = sorted(inputs.rglob("*"))
    def at(text: str) -> str:
        return text.replace("{tmp}", str(inputs))

    fails(capsys, shlex.split(at(argv)), *map(at, needles))
    assert not any((inputs / name).exists() for name in not_written)
    assert sorted(inputs.rglob("*")) == before  # nothing written, nothing removed


def test_demo_checks_the_checkpoint_before_preparing_the_model(inputs, capsys, monkeypatch):
    import training.models

    monkeypatch.setattr(training.models, "prepare_model", lambda *a, **k: pytest.fail("model prepared first"))
    fails(capsys, ["demo", "--mode", "amortized", "--checkpoint", str(inputs / "no-ckpt")],
          f"checkpoint {inputs / 'no-ckpt'} does not exist", CHECKPOINT_HINT)


def test_bank_remove_of_an_unknown_document_lists_the_banks_documents(bank, capsys):
    fails(capsys, ["bank", "remove", str(bank.path), "doc-a", "doc-z"],
          f"bank {bank.path} has no document doc-z; its documents: doc-a, doc-b (see `doc2atom bank info`)")
    assert len(type(bank).load(bank.path)) == 7  # doc-a was not removed either


def test_eval_unknown_method_creates_no_output_folder(tmp_path, tiny_model_dir, capsys):
    from training.data.build import BuildConfig, build_dataset

    build_dataset(BuildConfig(source="synthetic", out=tmp_path / "data", limit=4))
    capsys.readouterr()
    fails(capsys, ["eval", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "eval"), "--model",
                   str(tiny_model_dir), "--methods", "icl,telepathy", "--split", "train"],
          "unknown method 'telepathy': choose from", "icl")
    assert not (tmp_path / "eval").exists()


def test_empty_documents_are_skipped_with_a_warning_naming_them(inputs, caplog):
    with caplog.at_level(logging.WARNING, logger="training.compile.documents"):
        documents = read_documents([inputs / "doc.txt", inputs / "empty.txt", inputs / "blank.md"])
    assert list(documents) == ["doc"]
    assert f"{inputs / 'empty.txt'}: document 'empty' is empty, skipped" in caplog.text
    assert f"{inputs / 'blank.md'}: document 'blank' is empty, skipped" in caplog.text


def test_read_documents_raises_input_error_naming_the_file(inputs):
    with pytest.raises(InputError, match=f"document {inputs / 'latin1.txt'} is not UTF-8 text"):
        read_documents([inputs / "latin1.txt"])
    with pytest.raises(ValueError, match="line 2 is not JSON"):  # an InputError is a ValueError too
        read_documents([inputs / "bad.jsonl"])


class NoAtoms:
    """A document compiler that finds no atom in any document."""

    mode = "study"
    spec = None

    def __call__(self, doc_id: str, text: str) -> None:
        return None

    def create_bank(self, out, compiled, overwrite=False):
        raise AssertionError("no bank may be written")

    def compatible(self, spec) -> bool:
        return True

    def stats(self) -> dict:
        return {}


def test_a_compile_that_yields_no_atoms_writes_no_bank(tmp_path):
    with pytest.raises(InputError, match=r"nothing to compile: no atoms in any document \(dots, dashes\)"):
        compile_with(NoAtoms(), {"dots": "...", "dashes": "--"}, tmp_path / "bank")
    assert not (tmp_path / "bank").exists()
