#!/bin/bash
VARIANT=fast+qkv+even+lean+flat bash benchmarks/h200/step_vit_l14.sh
