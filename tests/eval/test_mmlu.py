"""MMLU: the standard 5-shot prompt, both CSV variants, shots dropped to fit the window, per-subject/micro/macro."""

import pytest

from llamakit.errors import EvalError
from llamakit.eval import evaluate_mmlu
from llamakit.eval.mmlu import Question, fitted_prompt, load_examples, prompt, read_subject

# Written out by hand from the five dev rows and the first test row of abstract_algebra.
ABSTRACT_ALGEBRA_5_SHOT = (
    "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
    "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. Statement 2 | If H and K are "
    "subgroups of G then HK is a subgroup of G.\nA. True, True\nB. False, False\nC. True, False\nD. False, True\n"
    "Answer: B\n\n"
    "Statement 1 | Every element of a group generates a cyclic subgroup of the group. Statement 2 | The symmetric "
    "group S_10 has 10 elements.\nA. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: C\n\n"
    "Statement 1| Every function from a finite set onto itself must be one to one. Statement 2 | Every subgroup of "
    "an abelian group is abelian.\nA. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: A\n\n"
    "Find the characteristic of the ring 2Z.\nA. 0\nB. 3\nC. 12\nD. 30\nAnswer: A\n\n"
    "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\nA. 0\nB. 4\nC. 2\nD. 6\n"
    "Answer:")


def test_standard_prompt_on_a_hand_checked_example(assets):
    mmlu = assets / "eval" / "mmlu"
    shots = read_subject(mmlu / "dev" / "abstract_algebra_dev.csv")
    question = read_subject(mmlu / "test" / "abstract_algebra_test.csv")[0]
    assert prompt("abstract_algebra", shots, question) == ABSTRACT_ALGEBRA_5_SHOT
    assert question.answer == 1


def test_official_headerless_csv_equals_the_header_variant(tmp_path):
    (tmp_path / "official.csv").write_text('"Which, of these?",x,y,z,w,C\nWhat is 1+1?,1,2,3,4,b\n')
    (tmp_path / "numbered.csv").write_text('question,choice0,choice1,choice2,choice3,answer\n'
                                           '"Which, of these?",x,y,z,w,2\nWhat is 1+1?,1,2,3,4,1\n')
    expected = [Question("Which, of these?", ("x", "y", "z", "w"), 2), Question("What is 1+1?", ("1", "2", "3", "4"), 1)]
    assert read_subject(tmp_path / "official.csv") == read_subject(tmp_path / "numbered.csv") == expected


def test_malformed_rows_name_file_and_line(tmp_path):
    (tmp_path / "bad.csv").write_text("q,a,b,c,d,A\nq,a,b,c,d,E\n")
    with pytest.raises(EvalError, match=r"bad.csv:2: answer 'E' is not one of A-D"):
        read_subject(tmp_path / "bad.csv")
    (tmp_path / "bad.csv").write_text("q,a,b,c,d\n")
    with pytest.raises(EvalError, match=r"bad.csv:1: 5 fields"):
        read_subject(tmp_path / "bad.csv")
    with pytest.raises(EvalError, match="no test/\\*_test.csv"):
        evaluate_mmlu(None, None, tmp_path, 512, 4)


def test_shots_are_dropped_from_the_end_to_fit(assets, stories):
    _, tokenizer = stories
    mmlu = assets / "eval" / "mmlu"
    shots = read_subject(mmlu / "dev" / "abstract_algebra_dev.csv")
    question = read_subject(mmlu / "test" / "abstract_algebra_test.csv")[0]
    full = len(tokenizer.encode(ABSTRACT_ALGEBRA_5_SHOT + " A", bos=True)) - 1
    assert fitted_prompt(tokenizer, "abstract_algebra", shots, question, full) == (ABSTRACT_ALGEBRA_5_SHOT, 5)
    text, k = fitted_prompt(tokenizer, "abstract_algebra", shots, question, full - 1)
    assert k == 4 and text == prompt("abstract_algebra", shots[:4], question)
    assert fitted_prompt(tokenizer, "abstract_algebra", shots, question, 8)[1] == 0  # then the context is truncated


def test_per_subject_micro_and_macro(assets, stories):
    model, tokenizer = stories
    result = evaluate_mmlu(model, tokenizer, assets / "eval" / "mmlu", 512, 16, limit=2)
    records, subjects = result.metrics, result.details
    assert len(subjects) == 57 and records["n"] == 114 and all(d["n"] == 2 for d in subjects.values())
    hits = [r["acc"] for r in result.records]
    assert records["acc"] == pytest.approx(sum(hits) / 114)
    assert records["acc_macro"] == pytest.approx(sum(d["acc"] for d in subjects.values()) / 57)
    assert all(0 <= r["n_shot"] <= 5 for r in result.records) and 0 < records["mean_n_shot"] < 5  # 512-token window
    assert all(r["pred"] == max(range(4), key=lambda i: r["logprobs"][i]) for r in result.records)


def test_uneven_subjects_make_micro_differ_from_macro(tmp_path, stories):
    model, tokenizer = stories
    for split in ("dev", "test"):
        (tmp_path / split).mkdir()
    (tmp_path / "dev" / "a_dev.csv").write_text("Q?,w,x,y,z,A\n")
    (tmp_path / "dev" / "b_dev.csv").write_text("Q?,w,x,y,z,A\n")
    (tmp_path / "test" / "a_test.csv").write_text("".join(f"Q{i}?,w,x,y,z,{'ABCD'[i % 4]}\n" for i in range(3)))
    (tmp_path / "test" / "b_test.csv").write_text("Q?,w,x,y,z,A\n")
    examples, meta = load_examples(tokenizer, tmp_path, 1, 512, None)
    assert [m for m in meta] == [("a", 1)] * 3 + [("b", 1)]
    result = evaluate_mmlu(model, tokenizer, tmp_path, 512, 4, n_shot=1)
    a, b = result.details["a"]["acc"], result.details["b"]["acc"]
    assert result.metrics["acc_macro"] == pytest.approx((a + b) / 2)
    assert result.metrics["acc"] == pytest.approx((3 * a + b) / 4)
    with pytest.raises(EvalError, match="1 questions for 5 shots"):
        load_examples(tokenizer, tmp_path, 5, 512, None)
