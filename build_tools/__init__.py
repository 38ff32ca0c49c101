"""The offline build (import path ``tcsched.build_tools``, folder build_tools/): export the classifier to ONNX,
analyse its layers (``analysis``), make and measure the precision variants, write the Triton model repository
and its manifest (``repository``, ``build``), and the TensorRT path for GPUs (``tensorrt_engine``,
``gpu_repository``). It never imports the scheduler or the clients."""
