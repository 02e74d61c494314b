"""Talk to `chameleon serve` with the official OpenAI client: list models, stream a chat answer.

    chameleon serve ~/.cache/chameleon/SmolLM2-135M-Instruct --served-model-name smollm2 \\
        --adapter pirate=DIR --api-key secret &
    python examples/openai_chat.py --model pirate "Where is the treasure?"
"""

from __future__ import annotations

import argparse

import openai


def main(base_url: str, api_key: str, model: str, question: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key=api_key)
    for m in client.models.list().data:
        parent = (m.model_extra or {}).get("parent")
        print(f"model {m.id}" + (f" (adapter of {parent})" if parent else ""))
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=96,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\n[{chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} generated tokens]")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("question", nargs="?", default="Why is the sky blue?")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="secret")
    parser.add_argument("--model", default="smollm2", help="the served base name or an adapter name")
    args = parser.parse_args()
    main(args.base_url, args.api_key, args.model, args.question)
