"""A zero-shot probe run inside training: top-1 on a small labelled image folder.

Images are preprocessed and the prompts tokenized once; each probe re-embeds the prompts with
the current text tower (it is being trained) and classifies the cached images. Cheap enough to
run every few hundred steps, and the signal a sweep's early stopping ranks trials by.
"""

from __future__ import annotations

from pathlib import Path

import torch


class ZeroShotProbe:
    def __init__(
        self,
        folder: str | Path,
        model_name: str,
        image_size: int,
        images_per_class: int = 4,
        max_templates: int = 8,
    ):
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2
        from PIL import Image

        from pipeline.evaluate.datasets import image_source, load_image_folder
        from pipeline.train.modeling import _quiet_root_logger, resolve_model_name

        data = load_image_folder(folder)
        picked: dict[int, int] = {}
        paths, labels = [], []
        for path, label in zip(data.paths, data.labels, strict=True):
            if picked.get(label, 0) < images_per_class:
                picked[label] = picked.get(label, 0) + 1
                paths.append(path)
                labels.append(label)
        transform = image_transform_v2(PreprocessCfg(size=image_size), is_train=False)
        self.images_NCHW = torch.stack(
            [transform(Image.open(image_source(p)).convert("RGB")) for p in paths]
        )
        self.labels_N = torch.tensor(labels)
        # A long template list (e.g. OpenAI's 80) would cost more than the probe is worth.
        templates = data.templates[:max_templates]
        with _quiet_root_logger():  # open_clip narrates the tokenizer's creation at INFO
            tokenizer = open_clip.get_tokenizer(resolve_model_name(model_name))
        prompts = [t(c) for c in data.classnames for t in templates]
        self.tokens_PL = tokenizer(prompts)
        self.num_classes = len(data.classnames)
        self.num_templates = len(templates)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, device: torch.device, batch: int = 256) -> float:
        """Top-1 accuracy (0..1) of ``model`` on the probe images; restores its train mode."""
        was_training = model.training
        model.eval()
        try:
            text_f = torch.cat(
                [
                    model.encode_text(t.to(device), normalize=True).float()
                    for t in self.tokens_PL.split(batch)
                ]
            )
            text_CTD = text_f.view(self.num_classes, self.num_templates, -1)
            classifier_CD = torch.nn.functional.normalize(text_CTD.mean(dim=1), dim=-1)
            image_f = torch.cat(
                [
                    model.encode_image(x.to(device), normalize=True).float()
                    for x in self.images_NCHW.split(batch)
                ]
            )
            predicted = (image_f @ classifier_CD.T).argmax(dim=-1).cpu()
            return (predicted == self.labels_N).float().mean().item()
        finally:
            model.train(was_training)
