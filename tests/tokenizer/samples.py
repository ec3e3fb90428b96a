"""Shared test data: published Llama 3 tokenizer data and a varied set of texts."""

# The reference pattern and special-token names are written out here rather than imported, so the
# parity tests check our module against the published data, not against itself.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIALS = LLAMA3_NAMED + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]

TEXTS = [
    "",
    "hello world",
    "Hello, World! How are you?",
    "12345 3.14159 1,000,000 2024-01-01",
    " leading space",
    "trailing space ",
    "  both  ",
    "a   \n\n\t b",
    "line1\nline2\r\nline3\n\n",
    "\n",
    " ",
    "\t\t",
    "café naïve résumé Ångström Straße",
    "日本語のテキスト、中文字符，한국어",
    "مرحبا بالعالم",
    "emoji 😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈!",
    "<s> hi </s>",
    "<unk><s></s>",
    "<|eot_id|><|begin_of_text|>x<|start_header_id|>user<|end_header_id|>",
    "don't you'll we've I'm HE'S",
    "tabs\tand\u00a0nbsp\u3000ideographic space",
    "mixed: ä😀中 a",
    "\ufffd a literal replacement character",
    "zero\u200bwidth joiner\u200d",
    "x = [i ** 2 for i in range(10)]  # code\n    return x",
    "a" * 300,
]
