"""Greedy outputs of one non-disaggregated vLLM engine (the baseline the P/D path must match).

Usage: python reference_engine.py MODEL_PATH IN.json OUT.json
IN: {"max_tokens": N, "completions": [prompt, ...], "chats": [[message, ...], ...]}
OUT: {"completions": [{"text", "token_ids"}], "chats": [...]}. Runs one engine on one core
(VLLM_CPU_OMP_THREADS_BIND from the caller), like each P/D engine, so numerics are comparable.
"""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    model_path, in_path, out_path = sys.argv[1:4]
    job = json.load(open(in_path))
    llm = LLM(model=model_path, enforce_eager=True, dtype="bfloat16", max_model_len=job.get("max_model_len", 4096))
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])

    def pack(outputs):
        return [{"text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids)} for o in outputs]

    result = {
        "completions": pack(llm.generate(job["completions"], params, use_tqdm=False)),
        "chats": pack(llm.chat(job["chats"], params, use_tqdm=False)),
    }
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    main()
