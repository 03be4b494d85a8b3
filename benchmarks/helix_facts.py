"""Load instances of the Helix placement benchmark (../shared/benchmarks/helix) as PlacementProblems.

Parts:
- ``DEFAULT_FACTS``: the facts file next to the repository.
- ``load_facts(path)``, ``helix_problem(facts, instance_id, graph)``: the instance as a
  ``PlacementProblem`` (capacity tables as ``tokens_per_s``, Kmax as ``max_layers``, the link set
  Helix's MILP used (``graph="milp"``) or the complete cluster (``graph="full"``)).
- ``stored_ranges(facts, key)``: a published placement (``solutions[key]``) as ``{id: (s, e)}``.
"""
from __future__ import annotations

import json
from pathlib import Path

from placement.problem import DeviceSpec, LinkSpec, ModelSpec, PlacementProblem

DEFAULT_FACTS = Path(__file__).resolve().parents[1].parent / "shared/benchmarks/helix/helix_placement_facts.json"


def load_facts(path: str | Path = DEFAULT_FACTS) -> dict:
    with open(path) as f:
        return json.load(f)


def helix_problem(facts: dict, instance_id: str, graph: str = "milp") -> PlacementProblem:
    inst = facts["instances"][instance_id]
    cluster = facts["clusters"][inst["cluster"]]
    model = facts["models"][inst["model"]]
    table = facts["capacity_tokens_per_s"][inst["capacity_context"]]["table"]
    L = int(model["num_layers"])
    spec = ModelSpec.uniform(L, int(model["layer_param_bytes"]), activation_bytes_per_token=int(model["activation_size_bytes"]),
                             token_bytes=int(model["token_size_bytes"]))
    members = set(inst["node_ids"])
    devices = []
    for i in inst["node_ids"]:
        t = cluster["nodes"][i]["type"]
        devices.append(DeviceSpec(str(i), int(facts["node_types"][t]["vram_bytes"]), tokens_per_s=tuple(table[t]),
                                  max_layers=len(table[t]), kind=t))
    links = cluster["links"]
    if graph == "milp" and inst.get("milp_link_set") == "pruned":
        keep = {(a, b) for a, b in cluster["pruned_links"]}
        links = [l for l in links if (l["u"], l["v"]) in keep]

    def name(x: object) -> str | None:
        if x in ("source", "sink"):
            return str(x)
        return str(x) if x in members else None

    specs = []
    for l in links:
        u, v = name(l["u"]), name(l["v"])
        if u is not None and v is not None:
            specs.append(LinkSpec(u, v, float(l["bandwidth_value"]), float(l["latency_s"])))
    return PlacementProblem(spec, tuple(devices), tuple(specs), kv_reserve_tokens=0)


def stored_ranges(facts: dict, key: str) -> dict[str, tuple[int, int]]:
    sol = facts["solutions"][key]
    members = facts["instances"][sol["instance"]]["node_ids"]
    rng = sol["ranges"]
    items = rng.items() if isinstance(rng, dict) else enumerate(rng)
    return {str(i): (int(r[0]), int(r[1])) for i, r in items
            if r is not None and int(i) in members and r[1] > r[0]}
