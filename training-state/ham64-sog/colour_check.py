# Usage: python colour_check.py PREFIX HAM10000_metadata.csv  (reads PREFIX-none/ and
# PREFIX-shades-of-gray/, two `anostyle prepare` outputs that differ only in --colour;
# validation split only)
"""Validation-only check: does shades-of-gray colour constancy help simple scores generalise?"""
import sys
import numpy as np
import pandas as pd
from PIL import Image
from sklearn.neighbors import NearestNeighbors
from sklearn.metrics import roc_auc_score
from stylegan.dataset import ImageDataset

meta = pd.read_csv(sys.argv[2]).set_index('image_id')

def feats(ds, size):
    out = []
    for i in range(len(ds)):
        img, _ = ds[i]
        im = Image.fromarray(img.transpose(1, 2, 0)).resize((size, size), Image.Resampling.BOX)
        out.append(np.asarray(im, np.float32).ravel() / 255)
    return np.stack(out)

def hist(ds, bins=8):
    out = []
    for i in range(len(ds)):
        img, _ = ds[i]
        q = (img.reshape(3, -1).astype(int) * bins) // 256
        h = np.bincount(q[0] * bins * bins + q[1] * bins + q[2], minlength=bins ** 3).astype(np.float32)
        out.append(np.sqrt(h / h.sum()))  # Hellinger
    return np.stack(out)

for variant in ('none', 'shades-of-gray'):
    d = f'{sys.argv[1]}-{variant}'
    man = pd.read_csv(f'{d}/manifest.csv')
    tr, va = ImageDataset(f'{d}/train.zip'), ImageDataset(f'{d}/val.zip')
    vm = man[man.split == 'val'].set_index('file').loc[va.names]
    dxt = meta.loc[vm.source.str.replace('.jpg', '', regex=False), 'dx_type'].to_numpy()
    cls = vm['class'].to_numpy()
    for name, f in (('pix16', lambda ds: feats(ds, 16)), ('hist8', hist)):
        ftr, fva = f(tr), f(va)
        nn = NearestNeighbors(n_neighbors=5).fit(ftr)
        s = nn.kneighbors(fva)[0].mean(1)
        res = []
        for sub, mask_nv in (('all', cls == 'nv'), ('histo', (cls == 'nv') & (dxt == 'histo')),
                             ('follow_up', (cls == 'nv') & (dxt == 'follow_up')),
                             ('consensus', (cls == 'nv') & (dxt == 'consensus'))):
            m = mask_nv | (cls == 'mel')
            y = (cls[m] == 'mel').astype(int)
            res.append(f'{sub}: {roc_auc_score(y, s[m]):.3f} (n_nv={mask_nv.sum()})')
        print(variant, name, ' | '.join(res), flush=True)
