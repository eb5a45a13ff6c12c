# Device-run helper: unpack the carried TileLang cache and precompile the layer/decode families
# (source it inside `bash .gpu/env.sh bash -c ...`; writes $OUT/pre.log).
tar xJf .tlcache.tar.xz 2>/dev/null
export TILELANG_CACHE_DIR=$PWD/.tlcache TILELANG_DEFAULT_TARGET='{"kind": "cuda", "arch": "sm_90a"}'
python3 -c "import sys; sys.argv=['x']; sys.path.insert(0,'tools'); import precompile as p; from concurrent.futures import ProcessPoolExecutor as E; fams=list(dict.fromkeys(p.nsa(2, 8, 64, 64, 32, 16, 64, 4, 64, 'bfloat16') + [f for f in p.test_families()+p.bench_families() if f[0]=='decode'])); list(E(16).map(p.build, fams)); print('pre ok')" > $OUT/pre.log 2>&1
tail -1 $OUT/pre.log
