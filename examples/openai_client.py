"""Ask a `vllm serve MODEL --plugin doc2atom` server about the documents of an atom bank.

    vllm serve ~/.cache/doc2atom/models/smollm2-135m-instruct --plugin doc2atom --doc2atom-bank-root banks
    python examples/openai_client.py --bank examples "Who wrote the Velmora Orchard Protocol?"

Prints the answer and the atoms it was composed from (or says the question was refused).
"""

import argparse

import openai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question")
    parser.add_argument("--bank", default="examples", help="atom bank, relative to the server's bank root")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    request = dict(model=model, messages=[{"role": "user", "content": args.question}], max_tokens=64,
                   temperature=0, extra_body={"atom_bank": args.bank})
    if args.stream:
        # Streamed answers carry their provenance in the x-doc2atom-provenance response header.
        raw = client.chat.completions.with_raw_response.create(stream=True, **request)
        for chunk in raw.parse():
            if chunk.choices:
                print(chunk.choices[0].delta.content or "", end="", flush=True)
        print("\nprovenance:", raw.headers["x-doc2atom-provenance"])
        return
    reply = client.chat.completions.create(**request)
    print(reply.choices[0].message.content)
    provenance = reply.model_extra["doc2atom"]  # also in the x-doc2atom-provenance header
    if provenance["refused"]:
        print("(refused: no atom of the bank covers this question)")
    for atom in provenance["atoms"]:
        print(f"  {atom['weight']:.2f}  {atom['type']:<18} {atom['id']}  chars {atom['span'][0]}-{atom['span'][1]}")


if __name__ == "__main__":
    main()
