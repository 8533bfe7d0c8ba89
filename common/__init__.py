"""The ground floor: the rules every layer shares (build_engine, model_repo, client, benchmarks all import
it; it imports none of them): the request's fields and limits, the error base and the refusal marker,
the command-line root."""
