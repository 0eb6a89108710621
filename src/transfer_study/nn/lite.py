"""EfficientNet-Lite's body as the registry uses it: its blocks, and its forward in stages."""

from torch import nn


def lite_blocks(body):
    model = body.model
    return [model._conv_stem, model._bn0, *model._blocks, model._conv_head, model._bn1]


class LiteStem(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.conv, self.norm, self.act = model._conv_stem, model._bn0, model._swish

    def forward(self, images):
        return self.act(self.norm(self.conv(images)))


class LiteBlock(nn.Module):
    def __init__(self, block, drop_connect_rate):
        super().__init__()
        self.block, self.drop_connect_rate = block, drop_connect_rate

    def forward(self, x):
        return self.block(x, drop_connect_rate=self.drop_connect_rate)


class LiteTop(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.conv, self.norm, self.act = model._conv_head, model._bn1, model._swish
        self.pool = model._avg_pooling

    def forward(self, x):
        return self.pool(self.act(self.norm(self.conv(x)))).flatten(1)


def lite_stages(body):
    """LiteBody.forward as modules: the stem, each block (with the drop-connect rate
    extract_features gives it), the head conv and pooling. They share the body's layers and are
    not registered in it, so the body's state_dict keeps its keys."""
    model = body.model
    rate = model._global_params.drop_connect_rate or 0.0
    count = len(model._blocks)
    blocks = [LiteBlock(block, rate * i / count) for i, block in enumerate(model._blocks)]
    return [LiteStem(model), *blocks, LiteTop(model)]


class LiteBody(nn.Module):
    """EfficientNet-Lite up to its global average pool: 1280 features (every Lite variant)."""

    def __init__(self, model):
        super().__init__()
        model._fc = nn.Identity()  # ImageNet's classifier is not part of the features
        self.model = model

    def forward(self, images):
        return self.model._avg_pooling(self.model.extract_features(images)).flatten(1)
