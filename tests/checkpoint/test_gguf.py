"""GGUF: what llamakit writes runs in llama.cpp as it runs here, and what llama.cpp writes loads here.

llama.cpp's side (convert_hf_to_gguf.py, llama-quantize, llama-server) is the build benchmarks/llama_cpp.py makes
once (`python benchmarks/llama_cpp.py`); the tests that need it skip, naming that command, when it is absent.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import gguf
import jinja2
import numpy as np
import pytest
import torch

from llamakit import ModelConfig, Transformer, load_model, save_model
from llamakit.checkpoint import detect_format, find_tokenizer, load_checkpoint, load_config
from llamakit.checkpoint.gguf import gguf_name, read_gguf
from llamakit.checkpoint.gguf_file import read_contents
from llamakit.checkpoint.gguf_vocab import CHAT_TEMPLATES
from llamakit.cli import main
from llamakit.errors import CheckpointError
from llamakit.generate import SamplingParams, generate
from llamakit.model.config import RopeScaling
from llamakit.model.quantize import Int4, Int4Linear, Int8, unpack_from_kernel
from llamakit.tokenizer import encode_dialog, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
DIALOG = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"},
          {"role": "assistant", "content": "Hello! "}, {"role": "user", "content": " Tell me a story."}]


def _llama_cpp_module():
    spec = importlib.util.spec_from_file_location("bench_llama_cpp", REPO / "benchmarks" / "llama_cpp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


llama_cpp = _llama_cpp_module()  # benchmarks/llama_cpp.py: the build, llama-server
LLAMA_CPP = llama_cpp.built()  # looked up before _tokenizer_cache points $LLAMAKIT_CACHE elsewhere


def need(*names: str) -> list[Path]:
    missing = [name for name in names if name not in LLAMA_CPP]
    if missing:
        pytest.skip(f"llama.cpp's {', '.join(missing)} not found; build it once with `python benchmarks/llama_cpp.py`")
    return [LLAMA_CPP[name] for name in names]


@pytest.fixture(scope="module", autouse=True)
def _tokenizer_cache(tmp_path_factory, one_thread):
    with pytest.MonkeyPatch.context() as mp:  # rebuilt GGUF tokenizers go here, not to ~/.cache
        mp.setenv("LLAMAKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def stories(assets):
    return load_model(assets / "tinyllamas" / "stories260K.bin"), assets / "tinyllamas" / "tok512.model"


@pytest.fixture(scope="module")
def ours(stories, tmp_path_factory):
    """stories260K written by llamakit in each GGUF type."""
    model, tok = stories
    folder = tmp_path_factory.mktemp("ours")
    return {kind: save_model(model, folder / f"{kind}.gguf", "gguf", tokenizer=tok, gguf_type=kind)
            for kind in ("f32", "f16", "q8_0", "q4_0")}


@pytest.fixture(scope="module")
def theirs(stories, tmp_path_factory):
    """stories260K written by llama.cpp: its converter on our Hugging Face export (f32, q8_0), llama-quantize (q4_0)."""
    converter, quantizer = need("convert_hf_to_gguf.py", "llama-quantize")
    model, tok = stories
    folder = tmp_path_factory.mktemp("theirs")
    save_model(model, folder / "stories260K", "hf", tokenizer=tok)
    for kind in ("f32", "q8_0"):
        subprocess.run([sys.executable, converter, folder / "stories260K", "--outtype", kind, "--outfile",
                        folder / f"{kind}.gguf"], check=True, capture_output=True)
    subprocess.run([quantizer, folder / "f32.gguf", folder / "q4_0.gguf", "q4_0"], check=True, capture_output=True)
    return {kind: folder / f"{kind}.gguf" for kind in ("f32", "q8_0", "q4_0")}


def tokens(n: int = 48) -> torch.Tensor:
    return torch.randint(0, 512, (3, n), generator=torch.Generator().manual_seed(0))


def logits(model, x=None) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens() if x is None else x)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_f32_and_f16_round_trips_are_exact(stories, ours):
    model, _ = stories
    for kind in ("f32", "f16"):
        assert detect_format(ours[kind]) == "gguf" and load_config(ours[kind]) == model.config
    assert torch.equal(logits(load_model(ours["f32"])), logits(model))
    f16 = load_model(ours["f16"])  # the same rounding as loading the source in fp16 (the norms, stored F32, too)
    assert f16.embed_tokens.weight.dtype == torch.float16
    assert torch.equal(logits(f16), logits(load_model(stories[1].parent / "stories260K.bin", dtype="fp16")))


def test_quantized_weights_are_within_each_formats_rounding(stories, ours):
    """Every value is within the rounding its block allows (a misplaced block or row would be far outside):
    Q8_0 d = max|x|/127, |x - d*q| <= d/2 plus d's fp16 rounding (<= 2^-11 * 127 d); Q4_0 d = -(the signed
    extreme)/8, q = x/d + 8 clamped to 15, so |x - d*(q - 8)| <= |d| (the clamp) plus fp16 rounding (8 * 2^-11 d)."""
    source, slack = stories[0].state_dict(), {"Q8_0": 0.5 + 127 * 2**-11, "Q4_0": 1 + 8 * 2**-11}
    for kind in ("q8_0", "q4_0"):
        _, state = read_gguf(ours[kind])
        types = {name: info.type.name for name, info in read_contents(ours[kind]).tensors.items()}
        assert types["blk.0.ffn_down.weight"] == "F16" and types["output_norm.weight"] == "F32"  # 172 % 32 != 0
        assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == kind.upper()  # tied head
        for name, w in source.items():
            if w.dim() == 2 and w.shape[1] % 32 == 0:
                blocks, kind_here = w.reshape(w.shape[0], -1, 32), types[gguf_name(name)]
                step = blocks.abs().amax(-1, keepdim=True) / (127 if kind_here == "Q8_0" else 8)
                assert ((state[name].reshape(blocks.shape) - blocks).abs() <= step * slack[kind_here] + 1e-7).all()


def test_quantized_logits_are_as_close_as_our_own_quantization(stories, ours):
    """Q8_0's blocks of 32 are finer than int8's one scale per row, and Q4_0 keeps the head at Q8_0 where
    int4 quantizes it too: so neither GGUF type may be further from the fp32 logits than llamakit's own
    int8 / int4 (groups of 32) of the same model."""
    model, _ = stories
    reference, src = logits(model), stories[1].parent / "stories260K.bin"
    for kind, ours_kind in (("q8_0", Int8()), ("q4_0", Int4(32))):
        ceiling = relative_error(logits(load_model(src, transforms=[ours_kind])), reference)
        assert relative_error(logits(load_model(ours[kind])), reference) <= ceiling, kind


def test_q4_0_loads_straight_into_int4(ours):
    """int4 with groups of 32 takes Q4_0's 4-bit values as they are: each weight is d * (q - 8) with only d rounded
    from fp16 to bf16 (8 significant bits), so within 2^-8 of the GGUF's own dequantized value, relatively
    (requantizing could not promise that)."""
    direct = load_model(ours["q4_0"], transforms=[Int4(32)])
    floats = load_model(ours["q4_0"])
    checked = 0
    for name, module in direct.named_modules():
        if isinstance(module, Int4Linear) and "down_proj" not in name and name != "lm_head":  # those are F16/Q8_0
            q = unpack_from_kernel(module.qweight).float()[:module.out_features]  # (out, in)
            scales, zeros = module.scales_and_zeros.float().unbind(-1)  # (G, n) each
            weight = (q - 8) * scales.t().repeat_interleave(32, dim=1)[:module.out_features]
            reference = floats.get_submodule(name).weight
            assert (zeros == 0).all() and ((weight - reference).abs() <= reference.abs() * 2**-8).all(), name
            checked += 1
    assert checked == 5 * 6
    assert relative_error(logits(direct), logits(floats)) < 0.1  # the F16/Q8_0 matrices are quantized to int4 again


def test_llamakit_writes_what_llama_cpp_writes(ours, theirs):
    """Tensors byte for byte as llama.cpp's converter (f32, q8_0) and llama-quantize (q4_0, ggml's C code) write
    them, q/k layout and type choices included; the keys both write hold the same values."""
    for kind, path in theirs.items():
        mine, reference = gguf.GGUFReader(ours[kind]), gguf.GGUFReader(path)
        assert {t.name: (t.tensor_type, t.data.tobytes()) for t in mine.tensors} == \
               {t.name: (t.tensor_type, t.data.tobytes()) for t in reference.tensors}, kind
        shared = set(mine.fields) & set(reference.fields)
        assert len(shared) > 20
        assert all(mine.fields[k].contents() == reference.fields[k].contents() for k in shared), kind


def test_llama_cpp_files_load(stories, theirs):
    """llama.cpp's own files: f32 gives the source's logits exactly; q8_0 and q4_0 are as close as our int8/int4."""
    model, tok = stories
    reference = logits(model)
    assert torch.equal(logits(load_model(theirs["f32"])), reference)
    assert load_config(theirs["f32"]) == model.config
    ceilings = {"q8_0": Int8(), "q4_0": Int4(32)}
    for kind in ("q8_0", "q4_0"):
        ceiling = relative_error(logits(load_model(tok.parent / "stories260K.bin", transforms=[ceilings[kind]])),
                                 reference)
        assert relative_error(logits(load_model(theirs[kind])), reference) <= ceiling, kind
    # the vocabulary comes back as a SentencePiece model that tokenizes like tok512.model (on text without runs
    # of spaces, which tok512 squeezes and GGUF cannot say so)
    rebuilt, original = load_tokenizer(find_tokenizer(theirs["f32"])), load_tokenizer(tok)
    text = (tok.parents[1] / "corpus" / "tinystories_sample.txt").read_text()
    assert rebuilt.encode(text) == original.encode(text) and len(original.encode(text)) > 1000
    assert (rebuilt.bos_id, rebuilt.eos_id, rebuilt.special_tokens) == (1, 2, original.special_tokens)


def test_our_reader_agrees_with_gguf_reader(theirs):
    """gguf_file walks the bytes itself (gguf.GGUFReader is 50x slower on a 128K vocabulary): same keys, values,
    tensor types, shapes and data."""
    for path in theirs.values():
        mine, reference = read_contents(path), gguf.GGUFReader(path)
        assert mine.meta == {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
        assert list(mine.tensors) == [t.name for t in reference.tensors]
        for t in reference.tensors:
            assert mine.tensors[t.name].type == t.tensor_type
            assert np.array_equal(mine.data(t.name), t.data)


def test_k_quants_dequantize(tmp_path):
    """llama-quantize's Q4_K_M (Q4_K and Q6_K blocks of 256) and Q6_K load through gguf's dequantization; each
    matrix is as close to its Gaussian source as the format's levels allow (measured 7.1% rms for Q4_K's 16 levels,
    1.8% for Q6_K's 64; a misread block layout or row order would be off by ~140%)."""
    (quantizer,) = need("llama-quantize")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=512))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p))
    source = save_model(model, tmp_path / "f32.gguf", "gguf")
    for kind, limits in (("Q4_K_M", {"Q4_K": 0.12, "Q6_K": 0.03}), ("Q6_K", {"Q6_K": 0.03})):
        out = tmp_path / f"{kind}.gguf"
        pure = [] if kind == "Q4_K_M" else ["--pure"]  # Q4_K_M mixes in Q6_K (output, some attn_v/ffn_down)
        subprocess.run([quantizer, *pure, source, out, kind], check=True, capture_output=True)
        types = {name: info.type.name for name, info in read_contents(out).tensors.items()}
        assert set(types.values()) == {"F32", *limits}
        loaded = load_model(out).state_dict()
        for name, w in model.state_dict().items():
            if w.dim() == 2:
                assert relative_error(loaded[name], w) < limits[types[gguf_name(name)]], name


def test_llama3_style_round_trip(assets, tmp_path):
    """Llama 3's tokenizer and 3.1's RoPE scaling: metadata as llama.cpp reads it, rope_freqs as transformers
    computes the scaling, the exact config and logits back, and Meta's tokenizer.model rebuilt byte for byte."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    torch.manual_seed(0)
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, hidden_dim=96,
                         rope_theta=500000.0, use_scaled_rope=True, rope_scaling=RopeScaling(factor=32.0),
                         max_seq_len=131072, tie_word_embeddings=True)
    model = Transformer(config).eval()
    path = save_model(model, tmp_path / "l3.gguf", "gguf", tokenizer=assets / "llama3" / "tokenizer.model")
    meta = read_contents(path).meta
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "llama-bpe")
    assert len(meta["tokenizer.ggml.tokens"]) == 128256 and len(meta["tokenizer.ggml.merges"]) == 280147  # as HF's
    assert meta["tokenizer.ggml.tokens"][128009] == "<|eot_id|>" and meta["tokenizer.ggml.token_type"][128009] == 3
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (128000, 128001)
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATES["llama3"]
    assert (meta["llama.rope.freq_base"], meta["llama.rope.dimension_count"]) == (500000.0, 16)
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2).float() / 16)
    assert np.allclose(read_contents(path).data("rope_freqs.weight"), plain / scaled, rtol=1e-6)
    loaded, tok = load_checkpoint(path)
    assert loaded.config == config
    x = torch.randint(0, 128256, (2, 40), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert tok.path.read_bytes() == (assets / "llama3" / "tokenizer.model").read_bytes()


def test_sentencepiece_vocabulary_round_trips(assets, tmp_path):
    """Llama 2's tokenizer (no whitespace squeezing, byte fallback) rebuilt from GGUF tokenizes identically."""
    model = Transformer(ModelConfig(dim=16, n_layers=1, n_heads=2, vocab_size=32000, hidden_dim=32))
    path = save_model(model, tmp_path / "l2.gguf", "gguf", tokenizer=assets / "llama2" / "tokenizer.model")
    original, rebuilt = load_tokenizer(assets / "llama2" / "tokenizer.model"), load_tokenizer(find_tokenizer(path))
    for text in ("Hello  world,\tagain\n\n", "  leading and trailing  ", "émoji 🦙 日本語 ünïcödé", "<s>[INST] x"):
        assert rebuilt.encode(text) == original.encode(text), text
    assert rebuilt.special_tokens == original.special_tokens and rebuilt.vocab_size == 32000


@pytest.mark.parametrize("style", ["llama2", "llama3", "alpaca"])
def test_chat_templates_render_our_formats(assets, style):
    """Rendered as llama.cpp does (Jinja, then bos/eos/special names in the text as tokens, a space before text
    that follows one), each template gives the ids tokenizer/chat.py encodes."""
    tok = load_tokenizer(assets / ("llama3" if style == "llama3" else "llama2") / "tokenizer.model")
    dialog = DIALOG[1:] if style == "alpaca" else DIALOG
    names = {"llama3": ("<|begin_of_text|>", "<|end_of_text|>")}.get(style, ("<s>", "</s>"))
    text = jinja2.Environment().from_string(CHAT_TEMPLATES[style]).render(
        messages=dialog, add_generation_prompt=True, bos_token=names[0], eos_token=names[1])
    expected = encode_dialog(tok, dialog, style)
    if style == "llama3":  # tiktoken spells special tokens out
        assert text == tok.decode(expected)
        return
    ids = []
    for part in text.replace("</s>", "\0</s>\0").replace("<s>", "\0<s>\0").split("\0"):
        ids += [tok.bos_id] if part == "<s>" else [tok.eos_id] if part == "</s>" else tok.encode(part) if part else []
    assert ids == expected


def test_chat_format_round_trips(stories, tmp_path):
    """A format other than the tokenizer's default is kept; the default (llama2 for SentencePiece) reads as None,
    which chats the same."""
    config, tok = stories[0].config, stories[1]
    for chat_format, back in (("alpaca", "alpaca"), ("llama3", "llama3"), ("llama2", None), (None, None)):
        model = Transformer(config.replace(chat_format=chat_format))
        path = save_model(model, tmp_path / f"{chat_format}.gguf", "gguf", tokenizer=tok)
        assert load_config(path).chat_format == back


@pytest.fixture(scope="module")
def llama_server(ours):
    """llama-server on our f32 stories260K: one thread, one slot, fp32 KV cache (its default f16 cache rounds)."""
    (server,) = need("llama-server")
    with llama_cpp.llama_server(server, ours["f32"], threads=1, n_ctx=512) as url:
        yield url


def test_llama_cpp_greedy_text_equals_llamakit(stories, ours, llama_server):
    """The same prompt, tokenized alike, continues into the same 200 greedy tokens in llama.cpp and in llamakit."""
    model, tok = load_checkpoint(ours["f32"])
    for prompt in ("Once upon a time", "Lily and Ben went to the park. They saw a big dog."):
        ids = tok.encode(prompt, bos=True)
        assert llama_cpp.post(llama_server, "/tokenize", {"content": prompt, "add_special": True})["tokens"] == ids
        theirs = llama_cpp.post(llama_server, "/completion", {"prompt": ids, "n_predict": 200, "temperature": 0.0,
                                                     "return_tokens": True, "cache_prompt": False})
        [mine] = generate(model, tok, [ids], 200, SamplingParams(temperature=0.0))
        assert theirs["tokens"] == mine.tokens and theirs["content"] == mine.text
        assert len(mine.tokens) > 50


def test_llama_cpp_chats_as_llamakit(ours, llama_server):
    """llama.cpp renders our chat template and tokenizes it into exactly the prompt llamakit's chat encodes."""
    _, tok = load_checkpoint(ours["f32"])
    prompt = llama_cpp.post(llama_server, "/apply-template", {"messages": DIALOG})["prompt"]
    ids = llama_cpp.post(llama_server, "/tokenize", {"content": prompt, "add_special": True, "parse_special": True})["tokens"]
    assert ids == encode_dialog(tok, DIALOG)


def test_cli_convert_to_gguf(stories, tmp_path, capsys):
    src = stories[1].parent / "stories260K.bin"
    assert main(["convert", str(src), str(tmp_path / "m.gguf"), "--to", "gguf", "--type", "q8_0",
                 "--tokenizer", str(stories[1])]) == 0
    assert read_contents(tmp_path / "m.gguf").meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "back"), "--to", "llamakit"]) == 0
    assert (tmp_path / "back" / "tokenizer.model").is_file()  # the GGUF's vocabulary, rebuilt
    assert main(["convert", str(src), str(tmp_path / "x"), "--to", "hf", "--type", "q8_0"]) == 1
    assert "--type applies to --to gguf only" in capsys.readouterr().err


def test_bad_files_are_named(ours, tmp_path):
    data = ours["f32"].read_bytes()
    for cut, what in ((len(data) // 2, "truncated"), (2000, "truncated or damaged")):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=what):
            load_model(tmp_path / "cut.gguf")
    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not supported"):
        load_model(tmp_path / "gpt2.gguf")
