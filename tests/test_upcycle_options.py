"""upcycle.options: the layout the options imply, and bad options."""

import pytest

from moekit.llama.errors import ConfigError
from moekit.upcycle import UpcycleOptions


def test_options_layout_and_errors():
    o = UpcycleOptions(num_experts=8, top_k=2, recipe="granular", granularity=4, shared_experts=1)
    assert (o.num_shards, o.routed_shards, o.total_experts, o.total_top_k) == (4, 3, 24, 6)
    assert o.function_preserving
    s = UpcycleOptions(shared_experts=1)
    assert (s.num_shards, s.routed_shards, s.total_experts, s.total_top_k) == (2, 1, 8, 2)
    assert UpcycleOptions(moe_layers="every-other").layers(5) == [1, 3]
    assert UpcycleOptions(moe_layers="3,0").layers(5) == [0, 3]
    assert not UpcycleOptions(recipe="drop").function_preserving
    assert not UpcycleOptions(recipe="granular", weight_scaling="none").function_preserving
    assert not UpcycleOptions(recipe="granular", router_init="zeros").function_preserving  # ties across groups
    assert UpcycleOptions(router_init="zeros").function_preserving  # plain copies: any router is exact
    for kw, msg in ((dict(top_k=3, num_experts=2), "--top-k 3 is greater than --num-experts 2"),
                    (dict(granularity=2), "--granularity is an option of --recipe granular"),
                    (dict(recipe="granular", granularity=2, shared_experts=2), "leaves no routed shard"),
                    (dict(recipe="granular", granularity=1), "must be an integer >= 2"),
                    (dict(recipe="bogus"), "--recipe 'bogus' is not one of"),
                    (dict(moe_layers="1,x"), "expected all, every-other or a list"),
                    (dict(moe_layers="1,1"), "listed twice"),
                    (dict(drop_ratio=1.5), "--drop-ratio must be in [0, 1]")):
        with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            UpcycleOptions(**kw)
    with pytest.raises(ConfigError, match="layer 7 does not exist"):
        UpcycleOptions(moe_layers=[7]).layers(3)


