"""Drives aigw with the official `openai` Python SDK, as applications do:
`AzureOpenAI(azure_endpoint=…)` on the Azure-shaped routes and
`OpenAI(base_url=…/v1)` / `…/openai/v1` on the OpenAI ones. Prints one JSON
object with what each client saw; the Rust test (azure_inbound.rs) checks it.
Env: AIGW_URL, AIGW_KEY, AIGW_ALIAS, AIGW_EMBED_ALIAS.
"""
import json
import os

from openai import AzureOpenAI, OpenAI

url, key = os.environ["AIGW_URL"], os.environ["AIGW_KEY"]
alias, embed = os.environ["AIGW_ALIAS"], os.environ["AIGW_EMBED_ALIAS"]
messages = [{"role": "user", "content": "hello from the sdk"}]


def chat(client):
    r = client.chat.completions.create(model=alias, messages=messages, max_tokens=16)
    raw = r.model_dump()
    return {
        "content": r.choices[0].message.content,
        "model": r.model,
        "total_tokens": r.usage.total_tokens,
        "content_filter_results": "content_filter_results" in raw["choices"][0],
        "prompt_filter_results": "prompt_filter_results" in raw,
    }


def stream(client):
    text, chunks = "", 0
    for c in client.chat.completions.create(model=alias, messages=messages, max_tokens=16, stream=True):
        chunks += 1
        # Azure's filter-annotation chunks have no delta (or no choices):
        # real Azure apps skip them the same way.
        delta = c.choices[0].delta if c.choices else None
        if delta is not None and delta.content:
            text += delta.content
    return {"content": text, "chunks": chunks}


def embeddings(client):
    r = client.embeddings.create(model=embed, input="hello from the sdk")
    return {"dimensions": len(r.data[0].embedding), "prompt_tokens": r.usage.prompt_tokens}


azure = AzureOpenAI(azure_endpoint=url, api_key=key, api_version="2024-10-21", max_retries=0)
v1 = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
openai_v1 = OpenAI(base_url=f"{url}/openai/v1", api_key=key, max_retries=0)
print(json.dumps({
    "azure": {"chat": chat(azure), "stream": stream(azure), "embeddings": embeddings(azure)},
    "v1": {"chat": chat(v1), "stream": stream(v1), "embeddings": embeddings(v1)},
    "openai_v1": {"chat": chat(openai_v1)},
}))
