"""Head-pose convention and the pose estimate from 5 keypoints.

Angles are degrees, ordered (yaw, pitch, roll). The head frame has x to the image's right, y up and
z towards the camera; a frontal face is (0, 0, 0). The rotation is R = Rz(roll) @ Rx(pitch) @ Ry(yaw):
  yaw > 0   the nose moves to the image's right (the subject turns to their own left),
  pitch > 0 the nose moves up (the subject looks up),
  roll > 0  the face turns counter-clockwise in the image.
Stating this matters: public head-pose datasets disagree on the sign of yaw (deep-head-pose #9).

When the metadata has no pose, it is estimated from 5 keypoints (ArcFace order: eye on the image's
left, eye on the image's right, nose tip, mouth corner on the image's left, on the image's right)
by fitting a generic 3D 5-point model under weak perspective (crops are small, so perspective
barely matters). The fit needs no camera intrinsics; it is approximate for real faces (the model
is an average face), exact for the synthetic heads, whose landmarks are the model's points.
"""
from __future__ import annotations

import numpy as np

ANGLE_NAMES = ("yaw", "pitch", "roll")

# Average face, millimetres, nose tip at the origin; x right, y up, z towards the camera.
# Used for keypoint-only metadata unless the file gives its own "keypoint_model".
FACE_MODEL_5PT = np.array([
    [-31.5, 33.0, -28.0],   # eye on the image's left (the subject's right eye)
    [31.5, 33.0, -28.0],
    [0.0, 0.0, 0.0],        # nose tip
    [-24.0, -29.0, -22.0],
    [24.0, -29.0, -22.0],
], dtype=np.float64)


def rotation_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """R = Rz(roll) @ Rx(pitch) @ Ry(yaw), angles in degrees (see the module doc for the signs)."""
    y, p, r = np.radians([yaw, pitch, roll])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    # pitch > 0 lifts the nose (+z towards +y), hence the sign pattern
    rx = np.array([[1, 0, 0], [0, np.cos(p), np.sin(p)], [0, -np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry


def euler_from_rotation(rot: np.ndarray) -> np.ndarray:
    """Inverse of `rotation_matrix` (pitch within +-90): [yaw, pitch, roll] in degrees."""
    # third row of Rz Rx Ry is [-cos p sin y, -sin p, cos p cos y]: Rz leaves it unchanged
    pitch = np.arcsin(np.clip(-rot[2, 1], -1.0, 1.0))
    yaw = np.arctan2(-rot[2, 0], rot[2, 2])
    # middle column is [-sin r cos p, cos r cos p, -sin p]
    roll = np.arctan2(-rot[0, 1], rot[1, 1])
    return np.degrees([yaw, pitch, roll])


def project(points3d: np.ndarray, pose, center: tuple[float, float], scale: float) -> np.ndarray:
    """Orthographic image coordinates (x right, y down, pixels) of head-frame points at `pose`."""
    cam = points3d @ rotation_matrix(*pose).T
    return np.stack([center[0] + scale * cam[:, 0], center[1] - scale * cam[:, 1]], axis=1)


def pose_from_keypoints(keypoints: np.ndarray, model: np.ndarray = FACE_MODEL_5PT) -> np.ndarray:
    """[yaw, pitch, roll] (degrees) from [K, 2] image keypoints and the matching [K, 3] model points.

    Weak perspective: (u, -v) - mean = s * R[:2] @ (X - mean). An affine 2x3 fit by least squares,
    then its rows are made orthonormal (the closest scaled rotation) and the third row is their
    cross product. Raises ValueError for degenerate input (fewer than 4 points, coincident points).
    """
    kp = np.asarray(keypoints, dtype=np.float64)[:, :2]
    model = np.asarray(model, dtype=np.float64)
    if kp.shape[0] != model.shape[0] or kp.shape[0] < 4:
        raise ValueError(f"need the same >= 4 points in the image and the model, got {kp.shape[0]} "
                         f"and {model.shape[0]}")
    if not np.all(np.isfinite(kp)):
        raise ValueError("keypoints are not finite")
    img = np.stack([kp[:, 0], -kp[:, 1]], axis=1)  # y up, like the head frame
    img = img - img.mean(axis=0)
    mod = model - model.mean(axis=0)
    affine, *_ = np.linalg.lstsq(mod, img, rcond=None)   # [3, 2]: img ~= mod @ affine
    rows = affine.T                                      # [2, 3] = s * R[:2]
    if np.linalg.norm(rows, axis=1).min() < 1e-9:
        raise ValueError("keypoints are degenerate (all at one place)")
    u, _, vt = np.linalg.svd(rows, full_matrices=False)  # closest matrix with orthonormal rows
    r12 = u @ vt
    rot = np.vstack([r12, np.cross(r12[0], r12[1])])
    return euler_from_rotation(rot)
