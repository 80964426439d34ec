"""The sending end: capture -> keypoints -> wire."""
