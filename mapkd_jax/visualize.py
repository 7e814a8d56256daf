"""One evaluation figure per sample: six cameras, predicted BEV next to ground truth, vectors.

BEV panels are drawn as a driver sees the map: ego x (forward) points up and y (left) points
left; vectors are drawn segment by segment as arrows, so their point order is visible.
"""
import cv2
import numpy as np

from mapkd_jax.data import schema

# RGB per class id of the semantic raster (0 = background); vectors use the lighter shade.
CLASS_COLORS = ((30, 30, 30), (255, 160, 0), (0, 170, 255), (230, 60, 60))
VECTOR_COLORS = ((255, 255, 255), (255, 230, 150), (160, 230, 255), (255, 170, 170))


def unnormalize_images(images):
  """[C, H, W, 3] ImageNet-normalized float -> uint8 RGB."""
  mean = np.asarray(schema.IMAGENET_MEAN, np.float32) * 255.0
  std = np.asarray(schema.IMAGENET_STD, np.float32) * 255.0
  return np.clip(np.asarray(images, np.float32) * std + mean, 0, 255).astype(np.uint8)


def bev_to_display(raster):
  """[H, W] raster (rows = y, columns = x) -> [W, H] display (x up, y left)."""
  return np.asarray(raster)[::-1, ::-1].T


def metres_to_display(points, bev_x, bev_y, scale):
  """[N, 2] (x, y) metres -> [N, 2] (column, row) float pixels of a display panel."""
  points = np.asarray(points, np.float64)
  return np.stack([(bev_y[1] - points[:, 1]) / bev_y[2] * scale,
                   (bev_x[1] - points[:, 0]) / bev_x[2] * scale], axis=1)


def bev_panel(classes, vectors, *, bev_x, bev_y, class_names, scale, title, arrow_tip_px=7):
  """Colour class raster with vectors drawn as arrows; RGB uint8 [W*scale, H*scale, 3]."""
  shown = np.asarray(CLASS_COLORS, np.uint8)[bev_to_display(classes)]
  panel = np.ascontiguousarray(np.repeat(np.repeat(shown, scale, axis=0), scale, axis=1))
  for vector in vectors:
    color = VECTOR_COLORS[class_names.index(vector['cls']) + 1]
    pix = np.round(metres_to_display(vector['pts'], bev_x, bev_y, scale)).astype(np.int32)
    for start, end in zip(pix[:-1], pix[1:]):
      length = max(float(np.hypot(*(end - start))), 1.0)
      # cv2 sizes the tip relative to the segment: convert to a fixed size in pixels.
      cv2.arrowedLine(panel, tuple(map(int, start)), tuple(map(int, end)), color, 1,
                      cv2.LINE_AA, tipLength=min(arrow_tip_px / length, 0.5))
  cv2.putText(panel, title, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
              cv2.LINE_AA)
  return panel


def render_sample(images, pred_classes, gt_classes, pred_vectors, gt_vectors, *, bev_x, bev_y,
                  class_names, title='', bev_height_px=400):
  """The evaluation figure of one sample.

  Args:
    images: [C, H, W, 3] normalized camera images (CAMERAS order: front row, then back row).
    pred_classes, gt_classes: [Hb, Wb] class maps (0 = background).
    pred_vectors, gt_vectors: [{'cls', 'pts' [N, 2] metres, ...}, ...].
    bev_x, bev_y: (min, max, step) metres.
    class_names: names of classes 1..K-1.
    title: text on the figure (e.g. the sample token).
    bev_height_px: BEV panels are upscaled by an integer factor to at least this height.

  Returns:
    [H', W', 3] uint8 RGB.
  """
  cams = unnormalize_images(images)
  per_row = (len(cams) + 1) // 2
  rows = [np.concatenate(list(cams[i:i + per_row]), axis=1)
          for i in range(0, len(cams), per_row)]
  rows[-1] = np.pad(rows[-1], ((0, 0), (0, rows[0].shape[1] - rows[-1].shape[1]), (0, 0)))
  cameras = np.concatenate(rows, axis=0)
  scale = max(1, int(np.ceil(bev_height_px / np.asarray(gt_classes).shape[1])))
  panels = [bev_panel(pred_classes, pred_vectors, bev_x=bev_x, bev_y=bev_y,
                      class_names=class_names, scale=scale, title='prediction'),
            bev_panel(gt_classes, gt_vectors, bev_x=bev_x, bev_y=bev_y,
                      class_names=class_names, scale=scale, title='ground truth')]
  gap = np.zeros((panels[0].shape[0], 4, 3), np.uint8)
  bev = np.concatenate([panels[0], gap, panels[1]], axis=1)
  width = max(cameras.shape[1], bev.shape[1])
  pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)))
  header = np.zeros((20, width, 3), np.uint8)
  cv2.putText(header, title, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
              cv2.LINE_AA)
  return np.concatenate([header, pad(cameras), pad(bev)], axis=0)


def save_png(path, image):
  """Writes an RGB uint8 image; raises OSError naming the path if it cannot."""
  if not cv2.imwrite(path, cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)):
    raise OSError(f'{path}: could not write PNG')
