"""Run a two-node `ray.cluster_utils.Cluster` on 127.0.0.1 until stdin closes.

Prints one JSON line first: the GCS address and the raylets' pids. A process of its own, so
that the environment Ray reads at import (token auth, loopback) is the one the test gives it.
"""

import json
import sys

from ray.cluster_utils import Cluster


def main() -> None:
    node = {"num_cpus": 2, "object_store_memory": 96 * 2**20, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    raylets = [n.all_processes["raylet"][0].process.pid for n in cluster.list_all_nodes()]
    print(json.dumps({"address": cluster.address, "raylets": raylets}), flush=True)
    sys.stdin.read()
    cluster.shutdown()


if __name__ == "__main__":
    main()
