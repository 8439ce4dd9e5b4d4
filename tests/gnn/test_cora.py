"""End to end: a 2-layer GCN built from our layers, trained on real Cora."""

import pytest
import torch
import torch.nn.functional as F

import frontiers_fast as ff
from frontiers_fast.data import load_cora


def test_cora_loader():
    d = load_cora()
    assert d.x.shape == (2708, 1433) and d.edge_index.shape == (2, 10556)
    assert int(d.train_mask.sum()) == 140 and int(d.val_mask.sum()) == 500 and int(d.test_mask.sum()) == 1000
    assert d.num_classes == 7
    torch.testing.assert_close(d.x.sum(1)[d.x.sum(1) > 0], torch.ones(int((d.x.sum(1) > 0).sum())))


@pytest.mark.slow
def test_gcn_trains_on_cora():
    torch.manual_seed(0)
    d = load_cora()
    g = ff.Graph(d.edge_index, d.num_nodes)

    class GCN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = ff.nn.GCNConv(1433, 16)
            self.conv2 = ff.nn.GCNConv(16, d.num_classes)

        def forward(self, x):
            x = F.dropout(x, 0.5, self.training)
            x = F.relu(self.conv1(x, g))
            x = F.dropout(x, 0.5, self.training)
            return self.conv2(x, g)

    model = GCN()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=5e-4)
    for _ in range(200):
        model.train()
        opt.zero_grad()
        loss = F.cross_entropy(model(d.x)[d.train_mask], d.y[d.train_mask])
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(d.x).argmax(1)
    acc = (pred[d.test_mask] == d.y[d.test_mask]).float().mean().item()
    assert acc >= 0.78, f"test accuracy {acc:.3f} < 0.78"
