"""A tiny Llama that calls a tool, deterministically: the real path (the chat template's tools,
the head's forced answer start, parsing, OpenAI's wire shape) with a model whose answers are known.

Its weights make it a bigram machine: embeddings are one-hot, every layer adds nothing (o_proj and
down_proj are zero), and lm_head maps each token to the one that follows it in `NEXT`. Its
tokenizer is byte-level (any text encodes) with a few whole-word tokens, and its chat template
(Hermes-style `<tool_call>`, rendering the tools, the calls and the tool's answers) ends the prompt
with `<|assistant|>`, or `<|assistant_after_tool|>` after a tool's answer. So:
- asked anything with tools, it calls get_weather for Paris;
- given the tool's answer, it says it is sunny in Paris;
- forced to start a call (tool_choice required or named: the head writes `<tool_call>` and a
  newline, and the grammar of a call of the one tool forces `{"name": "get_weather", "arguments":
  {"city": "`), it writes the city, `Paris"}}` (one token, which the grammar must allow).
A model that answered otherwise, or a template, parser or wire shape that lost the call, fails
the tests: nothing here can pass by accident.
"""

from __future__ import annotations

from pathlib import Path

CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
ANSWER = "It is sunny in Paris."
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|assistant|>", "<|assistant_after_tool|>"]
CITY = 'Paris"}}'  # after a forced '... {"city": "'
WORDS = ["<tool_call>", "</tool_call>", CALL, CITY, ANSWER]

TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these tools:\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    'Call one as <tool_call>{"name": ..., "arguments": {...}}</tool_call>.<|im_end|>\n{% endif %}'
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{% for call in message.tool_calls %}<tool_call>"
    "{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>tool\n{{ message.content }}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{% if messages[-1].role == 'tool' %}<|assistant_after_tool|>{% else %}<|assistant|>{% endif %}"
    "{% endif %}"
)


def write_tool_model(folder: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    backend.add_tokens(WORDS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    tokenizer.chat_template = TEMPLATE
    vocab = backend.get_vocab_size()
    ids = {word: backend.token_to_id(word) for word in SPECIALS + WORDS}
    quote = backend.token_to_id('"')
    follows = {
        ids["<|assistant|>"]: ids["<tool_call>"],
        ids["<tool_call>"]: ids[CALL],
        ids[CALL]: ids["</tool_call>"],
        quote: ids[CITY],  # the only free place in a forced call: the city's string
        ids["<|assistant_after_tool|>"]: ids[ANSWER],
    }
    hidden = -(-vocab // 8) * 8
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=ids["<|im_end|>"],
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)  # [V, H]: one-hot rows
        model.model.norm.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        head = model.lm_head.weight  # [V, H]
        for token in range(vocab):
            head[follows.get(token, ids["<|im_end|>"]), token] = 10.0
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
