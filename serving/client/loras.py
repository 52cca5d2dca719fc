"""LoRA adapters as the clients take them: `loras=[("name", 0.8), {"name": "b", "weight": -0.5},
"c:1.2", "d"]` (a weight left out is 1), as `ldm generate --lora NAME:WEIGHT` spells them."""


def lora_pairs(loras) -> list:
    """[(name, weight), ...] from tuples, {name, weight} dicts or `NAME[:WEIGHT]` texts; ValueError
    naming the one that is none of those."""
    pairs = []
    for item in loras or ():
        if isinstance(item, str):
            name, _, weight = item.rpartition(":") if ":" in item else (item, "", "")
            try:
                pairs.append((name, float(weight) if weight else 1.0))
            except ValueError:
                raise ValueError(f"{item!r}: the weight after ':' must be a number (NAME:WEIGHT)") from None
        elif isinstance(item, dict):
            pairs.append((item["name"], float(item.get("weight", 1.0))))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            pairs.append((item[0], float(item[1])))
        else:
            raise ValueError(f"{item!r}: give an adapter as (name, weight), {{'name', 'weight'}} or 'NAME:WEIGHT'")
        if not pairs[-1][0]:
            raise ValueError(f"{item!r}: the adapter's name is empty")
    return pairs
