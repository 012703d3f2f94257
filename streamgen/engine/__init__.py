"""Running a model as a stream: the preallocated K/V cache (:mod:`.cache`), the few-step
sampler (:mod:`.sampling`), one chunk through the cache (:mod:`.chunk_step`), the
``Pipeline`` / ``Session`` that own a model, its codecs and the re-cache policy
(:mod:`.pipeline`), and the speed options (:mod:`.compile`, :mod:`.fp8`,
:mod:`.overlapped_decode`)."""
