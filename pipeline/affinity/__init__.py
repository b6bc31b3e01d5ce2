"""AffinityNet random-walk refinement (Ahn & Kwak, CVPR 2018), an optional stage after the masks."""
