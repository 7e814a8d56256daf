"""Paths of the real nuScenes fixtures in ../shared/realdata (beside the checkout, in CI too).

Data: nuScenes (CC BY-NC-SA 4.0) and OpenStreetMap (ODbL); test fixtures only.
"""
import os

# The project's shared/ folder lies beside the repository checkout.
REALDATA = os.path.normpath(os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared', 'realdata'))
REAL_ROOT = os.path.join(REALDATA, 'nuscenes_scene0916_subset')
REAL_OSM = os.path.join(REALDATA, 'osm')
REAL_VERSION = 'v1.0-mini-extract'
REAL_LOCATION = 'singapore-queenstown'   # scene-0916's map
REAL_SCENE = 'scene-0916'                # its keyframes 0-9 have sensor files in the fragment
REAL_SCENE_KEYFRAMES_WITH_FILES = 10
OTHER_SCENE = 'scene-0523'               # tables only, boston-seaport, no map JSON
FIRST_SCENE0523_SAMPLE = 'ce03b6f0c1d2455aa18f6275917485bc'  # no sensor files in the fragment
