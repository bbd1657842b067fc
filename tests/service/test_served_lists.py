"""Served = evaluated: Recommend's whole-catalog lists are the lists the top-N harness scores.

The harness ranks the catalog with training's inner loop (training.methods.MetaLearnedTopN
over the model rebuilt from the artifact's files); the server runs the exported graph in
onnxruntime behind the batcher. For the same users and support sets, with the support
excluded, both must return the same top 20 in the same order.
"""

from __future__ import annotations

import numpy as np

from training.batching import EncodedCatalog
from training.export import load_exported_model
from training.methods import MetaLearnedTopN
from training.splits import Task, user_rows
from training.synthetic import generate_synthetic
from training.topn import Ranker, catalog_items, positive_counts
from warmstart.v1 import recommender_pb2 as pb

TOP = 20


def test_recommend_returns_the_lists_the_harness_scores(shared_server, tiny_artifact):
    dataset = generate_synthetic(seed=3, n_users=240, n_items=150)  # what the tiny artifact was trained on
    model = load_exported_model(tiny_artifact)
    method = MetaLearnedTopN("warmstart", model.model_config, model.inner_config, None)  # type: ignore[arg-type]
    method.model, method.catalog = model, EncodedCatalog(model.schema, dataset)
    items = catalog_items(dataset)
    ranker = Ranker(items, positive_counts(dataset, items))
    histories = user_rows(dataset)
    users = sorted(histories)[:12]
    compared = 0
    for k in (0, 1, 5, 12):
        tasks = []
        for user in users:
            rows = histories[user][:k]
            tasks.append(Task(user, dataset.item_ids[rows], dataset.labels[rows], np.array([], dtype=object), np.array([])))
        lists = ranker.lists(method, tasks, TOP)
        for task, expected in zip(tasks, lists):
            request = pb.RecommendRequest(
                user_attributes={f: "|".join(v) for f, v in dataset.users.get(task.user).items() if v},
                interactions=[pb.Interaction(item_id=i, label=float(y)) for i, y in zip(task.support_items, task.support_labels)],
                top_k=TOP,
                exclude_interacted=True,
            )
            served = [i.item_id for i in shared_server.stub.Recommend(request).items]
            assert served == [items[j] for j in expected], f"user {task.user}, K={k}"
            compared += 1
    assert compared == 4 * len(users)
