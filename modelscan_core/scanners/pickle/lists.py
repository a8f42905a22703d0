"""The default pickle policy as data: what is known dangerous, what is known safe.

Both lists have modelscan's shape (module -> list of names, or "*" for the whole module and
its submodules) so a settings file can extend or override them entry by entry. A global on
neither list is not silently allowed: the policy reports it at a severity that follows how
the pickle uses it (called, instantiated, only referenced).
"""

from __future__ import annotations

ALL = "*"

UNSAFE_GLOBALS: dict[str, dict[str, object]] = {
    "CRITICAL": {
        # code execution and the interpreter itself
        "builtins": ["eval", "exec", "execfile", "compile", "open", "breakpoint", "__import__", "getattr",
                     "setattr", "delattr", "apply", "globals", "locals", "vars", "input", "help",
                     "memoryview", "__loader__", "__spec__", "__build_class__", "classmethod",
                     "staticmethod", "property", "super", "map", "filter", "reload", "file"],
        "__builtin__": ["eval", "exec", "execfile", "compile", "open", "breakpoint", "__import__", "getattr",
                        "setattr", "delattr", "apply", "globals", "locals", "vars", "input", "help", "reload", "file"],
        "code": ALL, "codeop": ALL, "runpy": ALL, "types": ALL, "marshal": ALL, "ast": ALL, "dis": ALL,
        "inspect": ALL, "gc": ALL, "sys": ALL, "site": ALL, "ctypes": ALL, "_ctypes": ALL, "cffi": ALL,
        "importlib": ALL, "imp": ALL, "pkgutil": ALL, "zipimport": ALL, "_imp": ALL, "_frozen_importlib": ALL,
        "_frozen_importlib_external": ALL, "__main__": ["__builtins__"],
        # processes and the operating system
        "os": ALL, "nt": ALL, "posix": ALL, "_posixsubprocess": ALL, "subprocess": ALL, "pty": ALL,
        "commands": ALL, "popen2": ALL, "multiprocessing": ALL, "_multiprocessing": ALL, "asyncio": ALL,
        "shutil": ALL, "signal": ALL, "_signal": ALL, "resource": ALL, "fcntl": ALL, "posixpath": ALL,
        "ntpath": ALL, "genericpath": ALL, "tempfile": ALL, "platform": ALL, "concurrent.futures.process": ALL,
        "threading": ["Thread", "Timer", "_start_new_thread", "start_new_thread"],
        "_thread": ALL, "thread": ALL, "atexit": ALL, "faulthandler": ALL, "tracemalloc": ALL,
        "sysconfig": ALL, "webbrowser": ALL, "antigravity": ALL, "_osx_support": ALL, "_aix_support": ALL,
        "uuid": ["_get_command_stdout", "_popen", "_find_mac", "_find_mac_near_keyword", "_find_mac_under_heading"],
        "io": ["open", "open_code", "FileIO"], "_io": ["open", "open_code", "FileIO"], "codecs": ["open"],
        "_pyio": ALL,
        # debuggers, profilers and tools that run code handed to them
        "bdb": ALL, "pdb": ALL, "timeit": ALL, "cProfile": ALL, "profile": ALL, "trace": ALL, "doctest": ALL,
        "pydoc": ALL, "idlelib": ALL, "lib2to3": ALL, "ensurepip": ALL, "venv": ALL, "pip": ALL,
        "setuptools": ALL, "distutils": ALL, "_distutils_hack": ALL, "unittest": ALL, "test": ALL,
        "IPython": ALL, "ipykernel": ALL, "jupyter_client": ALL, "pytest": ALL, "_pytest": ALL,
        "operator": ["attrgetter", "methodcaller", "call"], "_operator": ["attrgetter", "methodcaller", "call"],
        "functools": ["reduce", "singledispatch"], "_functools": ["reduce"],
        "itertools": ["starmap"], "logging.config": ALL, "cgi": ALL, "cgitb": ALL,
        # nested deserialisation: a pickle inside the pickle, or another code-running loader
        "pickle": ALL, "_pickle": ALL, "cPickle": ALL, "pickletools": ALL, "shelve": ALL,
        # the unpickler's own tables: the extension registry, the reducers, the Python 2 name mappings
        "copyreg": ["add_extension", "remove_extension", "pickle", "constructor", "clear_extension_cache",
                    "_extension_registry", "_inverted_registry", "_extension_cache", "dispatch_table"],
        "copy_reg": ["add_extension", "remove_extension", "pickle", "constructor", "clear_extension_cache",
                     "_extension_registry", "_inverted_registry", "_extension_cache", "dispatch_table"],
        "_compat_pickle": ALL,
        "dill": ALL, "cloudpickle": ALL, "joblib": ["load", "Parallel", "Memory"],
        "joblib.numpy_pickle": ["load", "_unpickle", "NumpyUnpickler"], "joblib.externals": ALL, "joblib.parallel": ALL,
        "joblib._parallel_backends": ALL, "joblib.memory": ALL, "joblib._store_backends": ALL, "joblib.pool": ALL,
        "joblib.executor": ALL,
        "yaml": ["load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all", "UnsafeLoader",
                 "FullLoader", "Loader"],
        "jsonpickle": ALL, "xmlrpc": ALL,
        "numpy": ["load", "loads", "fromfile", "save", "savez", "savez_compressed", "savetxt", "loadtxt",
                  "genfromtxt", "memmap", "tofile"],
        "numpy.lib.npyio": ALL, "numpy.lib.format": ["read_array", "open_memmap"], "numpy.testing": ALL,
        "numpy.f2py": ALL, "numpy.distutils": ALL, "numpy.ctypeslib": ALL, "numpy.lib.utils": ALL,
        "numpy.core.multiarray": ["fromfile"], "numpy._core.multiarray": ["fromfile"],
        "pandas": ["read_pickle", "eval", "read_clipboard"], "pandas.io.pickle": ALL, "pandas.io.clipboard": ALL,
        "pandas.io.clipboards": ALL, "pandas.core.computation": ALL,
        "torch": ["load", "compile", "_load_global_deps", "from_file"], "torch.serialization": ["load", "_load", "_legacy_load"],
        "torch.jit": ["load", "_load_for_lite_interpreter", "CompilationUnit", "compile"],
        "torch.jit._serialization": ALL, "torch.hub": ALL, "torch.package": ALL, "torch.utils.cpp_extension": ALL,
        "torch._inductor": ALL, "torch._dynamo": ALL, "torch.fx.graph_module": ALL, "torch.utils._zip": ALL,
        "torch.fx.experimental": ALL, "torch.utils.collect_env": ALL, "torch.utils.bottleneck": ALL,
        "torch.ops": ["load_library"], "torch._ops": ["load_library"], "torch.classes": ["load_library"],
        # classes of torch's C core that compile TorchScript or load a model from a path or bytes
        "torch._C": ["CompilationUnit", "import_ir_module", "import_ir_module_from_buffer",
                     "_load_for_lite_interpreter", "_load_for_lite_interpreter_from_buffer", "_jit_pass_lower_all_tuples"],
        # native loaders of compiled models: AOTInductor's runners and package loader dlopen the
        # shared library a path names; nativert runs a packaged program
        "torch._C._aoti": ALL, "torch._C._nativert": ALL,
        # torch's benchmark Timer hands stmt/setup text to timeit.Timer, whose constructor execs a
        # template the text can leave (a bare \r ends a line the template does not indent);
        # valgrind and C++ JIT helpers start processes and compile code
        "torch.utils.benchmark.utils.timer": ALL, "torch.utils.benchmark.utils.valgrind_wrapper": ALL,
        "torch.utils.benchmark.utils.cpp_jit": ALL,
        "torch.multiprocessing": ALL, "torch.distributed.rpc": ALL, "torch.testing": ALL, "torch._jit_internal": ALL,
        "torch.utils._config_module": ALL, "torch.library": ALL, "torch.utils.data.datapipes": ALL,
        "keras.models": ["load_model"], "keras.saving": ["load_model"], "keras.src.saving": ALL,
        "keras.utils": ["get_file"], "keras.src.utils.file_utils": ALL, "tensorflow": ["py_function", "numpy_function",
        "load_library", "load_op_library"], "tensorflow.io": ALL, "tensorflow.saved_model": ALL,
        "tensorflow.keras.models": ["load_model"], "tensorflow.python.framework.load_library": ALL,
        "transformers.dynamic_module_utils": ALL, "transformers.utils.hub": ALL,
        "huggingface_hub": ALL, "sklearn.utils._testing": ALL, "sklearn.externals": ALL,
        "jinja2": ALL, "mako": ALL, "sympy": ["sympify", "parse_expr", "lambdify"], "sympy.parsing": ALL,
        "sympy.core.sympify": ALL, "sympy.utilities.lambdify": ALL,
    },
    "HIGH": {
        # network: clients, servers, cookie jars that read and write files (the enums and constants
        # of these modules are data types, trusted through names.txt)
        "socket": ALL, "_socket": ALL, "ssl": ALL, "_ssl": ALL, "select": ALL, "selectors": ALL,
        "http.client": ALL, "http.server": ALL, "http.cookiejar": ["FileCookieJar", "MozillaCookieJar", "LWPCookieJar"],
        "httplib": ALL, "cookielib": ALL, "Cookie": ALL,
        "urllib.request": ALL, "urllib.robotparser": ALL, "urllib": ["urlopen", "urlretrieve", "URLopener", "FancyURLopener"],
        "urllib2": ALL, "urllib3": ALL, "requests": ALL, "requests.api": ALL, "aiohttp": ALL,
        "aiohttp.client": ALL, "httpx": ALL, "ftplib": ALL, "smtplib": ALL, "poplib": ALL, "imaplib": ALL,
        "telnetlib": ALL, "nntplib": ALL, "socketserver": ALL, "SocketServer": ALL, "wsgiref": ALL,
        "asyncore": ALL, "asynchat": ALL, "paramiko": ALL, "websocket": ALL, "websockets": ALL, "smtpd": ALL,
        "mailbox": ALL, "xmlrpclib": ALL, "BaseHTTPServer": ALL, "SimpleHTTPServer": ALL, "CGIHTTPServer": ALL,
        "torch.distributed": ALL, "tensorflow": ALL, "wave": ALL, "aifc": ALL, "sunau": ALL, "tkinter": ALL,
        "_tkinter": ALL, "turtle": ALL, "Tkinter": ALL,
        # files: read, list, write through a side door (also classes of the ecosystem that open a
        # file by name when constructed: a relative name is no path to the argument rules)
        "scipy.io": ["FortranFile", "netcdf_file", "netcdf_variable", "savemat", "loadmat", "whosmat", "mmread",
                     "mmwrite", "hb_read", "hb_write", "readsav"],
        "torch._C": ["PyTorchFileWriter", "PyTorchFileReader"], "torch.utils.tensorboard": ALL,
        "numpy.lib._datasource": ALL, "numpy.lib.npyio": ALL,
        "io": ["TextIOWrapper", "BufferedReader", "BufferedWriter", "BufferedRandom"],
        "_io": ["TextIOWrapper", "BufferedReader", "BufferedWriter", "BufferedRandom"],
        "codecs": ["EncodedFile", "StreamReaderWriter", "StreamRecoder"], "fileinput": ALL,
        "linecache": ALL, "glob": ALL, "filecmp": ALL, "zipfile": ALL, "tarfile": ALL,
        "gzip": ["open", "GzipFile"], "bz2": ["open", "BZ2File"], "lzma": ["open", "LZMAFile"], "sqlite3": ALL,
        "dbm": ALL, "mmap": ALL, "logging": ["FileHandler", "basicConfig"], "logging.handlers": ALL,
        "pathlib": ALL, "mailcap": ALL, "netrc": ALL, "configparser": ALL, "pandas.io": ALL,
        "pandas": ["read_csv", "read_table", "read_json", "read_html", "read_xml", "read_excel", "read_parquet",
                   "read_feather", "read_orc", "read_sas", "read_spss", "read_sql", "read_sql_query", "read_sql_table",
                   "read_stata", "read_fwf", "read_hdf", "read_gbq", "HDFStore", "ExcelWriter"],
        "operator": ALL, "_operator": ALL, "functools": ["partialmethod"], "builtins": ["print", "exit", "quit"],
        "__builtin__": ["print", "exit", "quit"], "threading": ALL, "concurrent": ALL, "sched": ALL,
        "queue": ALL, "contextlib": ALL, "abc": ["ABCMeta"],
        # weak references call a function when their object dies: a call the load arranges
        "weakref": ["ref", "proxy", "finalize", "WeakMethod", "ReferenceType", "ProxyType", "CallableProxyType"],
        "_weakref": ALL,
    },
    "MEDIUM": {},
    "LOW": {},
}

# Names the ML ecosystem's pickles are rebuilt from, each with why it is safe to let a
# pickle call it with arguments the attacker chooses. An entry is one object ("module:name",
# matched after the name is resolved to the object it really is, see names.py). A "module:*"
# entry trusts that module's classes, its pickle-support helpers and references to its
# names, never calls of its other functions. A dangerous name is never added here.
_SAFE_BY_REASON: dict[str, list[str]] = {
    "builtin value types: they build a value from their arguments and run nothing else": [
        "builtins:set", "builtins:frozenset", "builtins:bytearray", "builtins:bytes", "builtins:slice",
        "builtins:complex", "builtins:range", "builtins:list", "builtins:dict", "builtins:tuple", "builtins:int",
        "builtins:float", "builtins:bool", "builtins:str", "builtins:object", "builtins:reversed", "builtins:enumerate",
        "__builtin__:set", "__builtin__:frozenset", "__builtin__:bytearray", "__builtin__:slice", "__builtin__:complex",
        "__builtin__:xrange", "__builtin__:list", "__builtin__:dict", "__builtin__:tuple", "__builtin__:int",
        "__builtin__:float", "__builtin__:bool", "__builtin__:str", "__builtin__:unicode", "__builtin__:long",
        "__builtin__:object", "__builtin__:reversed", "__builtin__:enumerate", "__builtin__:basestring",
    ],
    "builtin constants": [
        "builtins:Ellipsis", "builtins:NotImplemented", "builtins:True", "builtins:False", "builtins:None",
        "__builtin__:Ellipsis", "__builtin__:NotImplemented", "__builtin__:True", "__builtin__:False", "__builtin__:None",
    ],
    "type(x) is how pickle writes NoneType and its kin; the three-argument form, which builds a class, "
    "is judged by what the class holds": ["builtins:type", "__builtin__:type"],
    "the reconstructors pickle itself writes for objects (protocols 0-1 and 2+); the class they are "
    "given is judged as instantiated": [
        "copyreg:_reconstructor", "copyreg:__newobj__", "copyreg:__newobj_ex__", "copy_reg:_reconstructor",
        "copy_reg:__newobj__", "copy_reg:__newobj_ex__",
    ],
    "protocol 2 writes bytes as _codecs.encode(text, 'latin1'); a codec is looked up only inside the "
    "encodings package": ["_codecs:encode", "_codecs:decode", "codecs:encode", "codecs:decode"],
    "containers: they store the items they are given (a defaultdict's factory is judged as called when "
    "the pickle looks a key up)": [
        "collections:OrderedDict", "collections:defaultdict", "collections:deque", "collections:Counter",
        "collections:ChainMap", "collections:UserDict", "collections:UserList", "collections:UserString",
    ],
    "stores a callable and arguments; calling the partial is judged as calling that callable":
        ["functools:partial"],
    "typing's generic aliases (Optional[int]) pickle as getitem(origin, args)": ["operator:getitem", "_operator:getitem"],
    "values of the standard library: dates, numbers, ids, addresses, paths (making one touches no file)": [
        "datetime:date", "datetime:datetime", "datetime:time", "datetime:timedelta", "datetime:timezone",
        "datetime:tzinfo", "decimal:Decimal", "decimal:Context", "fractions:Fraction", "uuid:UUID", "uuid:SafeUUID",
        "array:array", "array:_array_reconstructor", "argparse:Namespace", "types:SimpleNamespace", "random:Random",
        "zoneinfo:ZoneInfo", "zoneinfo:ZoneInfo._unpickle", "ipaddress:*", "numbers:*", "string:Template",
        "pathlib:Path", "pathlib:PosixPath", "pathlib:WindowsPath", "pathlib:PurePath", "pathlib:PurePosixPath",
        "pathlib:PureWindowsPath", "pathlib._local:Path", "pathlib._local:PosixPath", "pathlib._local:WindowsPath",
        "pathlib._local:PurePath", "pathlib._local:PurePosixPath", "pathlib._local:PureWindowsPath",
        "io:BytesIO", "io:StringIO", "_io:BytesIO",
    ],
    "compiled regular expressions: compiling a pattern runs no code": [
        "re:_compile", "re:compile", "re:Pattern", "re:RegexFlag",
    ],
    "returns the logger of that name (how a Logger pickles); making one adds no handler":
        ["logging:getLogger"],
    "the base classes of enums and type hints, and the dataclass field markers; a class built from them "
    "is a plain class": ["enum:*", "typing:*", "dataclasses:*"],
    "a type hint written as text: ForwardRef compiles it as an expression and never evaluates it; nothing "
    "a load runs calls get_type_hints": ["typing:ForwardRef"],
    "time zones": [
        "pytz:_p", "pytz:_UTC", "pytz:UTC", "pytz:utc", "pytz:timezone", "pytz:FixedOffset", "dateutil.tz.tz:*",
        "dateutil.tz:tzutc", "dateutil.tz:tzoffset", "dateutil.tz:tzlocal", "dateutil.tz:tzfile", "dateutil.tz:tzstr",
        "dateutil.tz:tzrange", "dateutil.tz:UTC",
    ],
    "sklearn's Cython trees rebuild through newObj(cls) = cls.__new__(cls); the class is judged as "
    "instantiated": [
        "sklearn.neighbors._kd_tree:newObj", "sklearn.neighbors._ball_tree:newObj",
        "sklearn.neighbors._binary_tree:newObj", "sklearn.metrics._dist_metrics:newObj",
    ],
    "statsmodels' Cython state-space classes (d/s/c/z prefixes per dtype)": [
        "statsmodels.tsa.statespace._representation:*", "statsmodels.tsa.statespace._kalman_filter:*",
        "statsmodels.tsa.statespace._kalman_smoother:*", "statsmodels.tsa.statespace._simulation_smoother:*",
        "statsmodels.tsa.statespace._initialization:*", "statsmodels.tsa.statespace._cfa_simulation_smoother:*",
        "statsmodels.tsa.statespace._tools:*",
    ],
    "numpy arrays, scalars, dtypes and masked arrays": [
        "ml_dtypes:*", "numpy:dtype", "numpy:ndarray", "numpy:matrix", "numpy:bool_", "numpy:bool", "numpy:int8",
        "numpy:int16", "numpy:int32", "numpy:int64", "numpy:uint8", "numpy:uint16", "numpy:uint32", "numpy:uint64",
        "numpy:float16", "numpy:float32", "numpy:float64", "numpy:float128", "numpy:complex64", "numpy:complex128",
        "numpy:complex256", "numpy:object_", "numpy:str_", "numpy:bytes_", "numpy:void", "numpy:datetime64",
        "numpy:timedelta64", "numpy:longlong", "numpy:ulonglong", "numpy:intc", "numpy:uintc", "numpy:intp",
        "numpy:uintp", "numpy:half", "numpy:single", "numpy:double", "numpy:longdouble", "numpy:csingle",
        "numpy:cdouble", "numpy:clongdouble", "numpy:generic", "numpy:number", "numpy:float_", "numpy:int_",
        "numpy:uint", "numpy:complex_", "numpy:unicode_", "numpy:string_", "numpy:short", "numpy:ushort",
        "numpy:byte", "numpy:ubyte", "numpy:longfloat", "numpy:clongfloat", "numpy:record", "numpy:recarray",
        "numpy:random", "numpy.core.multiarray:_reconstruct", "numpy.core.multiarray:scalar",
        "numpy.core.multiarray:ndarray", "numpy.core.multiarray:dtype", "numpy._core.multiarray:_reconstruct",
        "numpy._core.multiarray:scalar", "numpy._core.multiarray:ndarray", "numpy._core.multiarray:dtype",
        "numpy.core.numeric:_frombuffer", "numpy._core.numeric:_frombuffer", "numpy.core.records:recarray",
        "numpy.core.records:record", "numpy.rec:recarray", "numpy.rec:record", "numpy._core.records:recarray",
        "numpy._core.records:record", "numpy._core._internal:_convert_to_stringdtype_kwargs",
        "numpy.core._internal:_convert_to_stringdtype_kwargs", "numpy.dtypes:*", "numpy.ma.core:_mareconstruct",
        "numpy.ma.core:MaskedArray", "numpy.ma.core:MaskedConstant",
    ],
    "numpy's ufunc reconstructor: it imports module.name given as strings, which are judged as that name": [
        "numpy.core:_ufunc_reconstruct", "numpy._core:_ufunc_reconstruct",
    ],
    "numpy random generators and their states": [
        "numpy.random._pickle:*", "numpy.random:RandomState", "numpy.random:Generator", "numpy.random:MT19937",
        "numpy.random:PCG64", "numpy.random:PCG64DXSM", "numpy.random:Philox", "numpy.random:SFC64",
        "numpy.random:SeedSequence", "numpy.random:BitGenerator", "numpy.random:__RandomState_ctor",
        "numpy.random.mtrand:RandomState", "numpy.random.mtrand:__RandomState_ctor",
        "numpy.random._generator:Generator", "numpy.random._mt19937:MT19937", "numpy.random._pcg64:PCG64",
        "numpy.random._pcg64:PCG64DXSM", "numpy.random._philox:Philox", "numpy.random._sfc64:SFC64",
        "numpy.random.bit_generator:SeedSequence", "numpy.random.bit_generator:BitGenerator",
    ],
    "torch tensors, storages and their value types (dtypes, layouts... are generated from torch into "
    "names.txt)": [
        "torch:Size", "torch:device", "torch:dtype", "torch:layout", "torch:memory_format", "torch:finfo",
        "torch:iinfo", "torch:Tensor", "torch:FloatStorage", "torch:DoubleStorage", "torch:HalfStorage",
        "torch:BFloat16Storage", "torch:LongStorage", "torch:IntStorage", "torch:ShortStorage", "torch:CharStorage",
        "torch:ByteStorage", "torch:BoolStorage", "torch:ComplexFloatStorage", "torch:ComplexDoubleStorage",
        "torch:QUInt8Storage", "torch:QInt8Storage", "torch:QInt32Storage", "torch:QUInt4x2Storage",
        "torch:QUInt2x4Storage", "torch:UntypedStorage", "torch:TypedStorage", "torch:Generator", "torch:nn",
        "torch:qscheme", "torch._C:_nn", "torch._C:_VariableFunctions", "torch._C:Size", "torch._C:device",
        "torch._C:dtype", "torch._C:layout", "torch._C:memory_format", "torch._C:Generator", "torch._C:_TensorBase",
        "torch._C:TensorBase", "torch._C:qscheme", "torch.storage:UntypedStorage", "torch.storage:TypedStorage",
        "torch.storage:_TypedStorage", "torch.serialization:_get_layout", "torch.nn.parameter:Parameter",
        "torch.nn.parameter:UninitializedParameter", "torch.nn.parameter:Buffer",
    ],
    "torch's rebuild helpers: they make a tensor or parameter from storage and metadata": [
        "torch._utils:_rebuild_tensor", "torch._utils:_rebuild_tensor_v2", "torch._utils:_rebuild_tensor_v3",
        "torch._utils:_rebuild_parameter", "torch._utils:_rebuild_parameter_with_state",
        "torch._utils:_rebuild_sparse_tensor", "torch._utils:_rebuild_nested_tensor", "torch._utils:_rebuild_qtensor",
        "torch._utils:_rebuild_device_tensor_from_numpy", "torch._utils:_rebuild_device_tensor_from_cpu_tensor",
        "torch._utils:_rebuild_meta_tensor_no_storage", "torch._utils:_rebuild_wrapper_subclass",
        "torch._utils:_rebuild_xla_tensor", "torch._utils:_rebuild_mtia_tensor", "torch._utils:_rebuild_mkldnn_tensor",
    ],
    "sets an object's attributes from a state, as BUILD does; the state is judged as BUILD's":
        ["torch._utils:_set_obj_state"],
    "calls its first argument with the given arguments; that argument is judged as called": [
        "torch._tensor:_rebuild_from_type", "torch._tensor:_rebuild_from_type_v2",
    ],
    "torch.load of bytes (how a storage pickles): the bytes are scanned as a pickle of their own":
        ["torch.storage:_load_from_bytes"],
    "torch modules, optimizers, schedulers, quantization, distributions, datasets: classes rebuilt from "
    "their state": [
        "torch.nn.modules:*", "torch.nn.utils.parametrize:*", "torch.nn.utils.weight_norm:*",
        "torch.nn.utils.spectral_norm:*", "torch.nn.functional:*", "torch.nn.init:*", "torch.nn:Module",
        "torch.nn:Sequential", "torch.nn:ModuleList", "torch.nn:ModuleDict", "torch.nn:ParameterList",
        "torch.nn:ParameterDict", "torch.optim:*", "torch.amp:GradScaler", "torch.amp.grad_scaler:GradScaler",
        "torch.amp.grad_scaler:_refresh_per_optimizer_state", "torch.amp.grad_scaler:OptState",
        "torch.cuda.amp.grad_scaler:GradScaler", "torch.cuda.amp.grad_scaler:_refresh_per_optimizer_state",
        "torch.cuda.amp.grad_scaler:OptState", "torch.cuda.amp:GradScaler", "torch.ao.quantization:*",
        "torch.quantization:*", "torch.ao.nn:*", "torch.nn.quantized:*", "torch.nn.intrinsic:*", "torch.nn.qat:*",
        "torch._C._nn:*", "torch._VF:*", "torch.return_types:*", "torch.distributions:*",
        "torch.utils.data.dataset:*", "torch.utils.data.sampler:*", "torch.utils.hooks:RemovableHandle",
        "torch.utils.hooks:BackwardHook", "torch.ao.quantization.observer:*", "torch.fx.immutable_collections:*",
        "torchvision.transforms:*",
    ],
    "distributed checkpoints: tensor sharding metadata": [
        "torch.distributed._shard.sharded_tensor:*", "torch.distributed._tensor:*", "torch.distributed.tensor:*",
        "torch.distributed.checkpoint:metadata", "torch.distributed.checkpoint.metadata:*",
        "torch.distributed.checkpoint.filesystem:_StorageInfo", "torch.distributed.checkpoint.planner:*",
        "torch.distributed._shard.metadata:*", "torch.distributed._shard.sharding_spec:*",
        "torch.distributed.device_mesh:DeviceMesh",
    ],
    "torch classes whose pickles are data (an fx GraphModule's code is judged where it is rebuilt)": [
        "torch.fx.graph_module:GraphModule", "torch._dynamo.decorators:_DimRange",
    ],
    "TorchScript archives: torch.jit.load's C++ unpickler accepts only these and __torch__ classes": [
        "torch.jit._pickle:build_intlist", "torch.jit._pickle:build_tensorlist", "torch.jit._pickle:build_doublelist",
        "torch.jit._pickle:build_boollist", "torch.jit._pickle:build_tensor_from_id", "torch.jit._pickle:restore_type_tag",
    ],
    "scikit-learn, scipy and pandas containers and values": [
        "sklearn.utils._bunch:Bunch", "sklearn.compose._column_transformer:make_column_selector", "scipy.sparse:*",
        "scipy.sparse._csr:*", "scipy.sparse._csc:*", "scipy.sparse._coo:*", "scipy.stats._distn_infrastructure:*",
        "pandas._libs.internals:_unpickle_block", "pandas.core.internals.blocks:*",
        "pandas.core.internals.managers:*", "pandas.core.frame:DataFrame", "pandas.core.series:Series",
        "pandas.core.indexes.base:_new_Index", "pandas.core.indexes.base:Index", "pandas.core.indexes.range:RangeIndex",
        "pandas.core.indexes.multi:MultiIndex", "pandas.core.indexes.datetimes:_new_DatetimeIndex",
        "pandas.core.indexes.datetimes:DatetimeIndex", "pandas.core.indexes.period:_new_PeriodIndex",
        "pandas.core.indexes.period:PeriodIndex", "pandas.core.arrays:*", "pandas.core.dtypes.dtypes:*",
        "pandas._libs.tslibs.timestamps:_unpickle_timestamp", "pandas._libs.tslibs.timestamps:Timestamp",
        "pandas._libs.tslibs.timedeltas:_timedelta_unpickle", "pandas._libs.tslibs.timedeltas:Timedelta",
        "pandas._libs.tslibs.nattype:__nat_unpickle", "pandas._libs.tslibs.offsets:*",
        "pandas._libs.arrays:__pyx_unpickle_NDArrayBacked", "pandas.core.arrays.categorical:Categorical",
    ],
    "dill's helpers for plain data: a built-in type by name (calling what it returns is a dynamic call) "
    "and numpy arrays": ["dill._dill:_load_type", "dill._dill:_create_array"],
    "omegaconf configs (interpolations are resolved on access, not on load)": [
        "omegaconf:DictConfig", "omegaconf:ListConfig", "omegaconf.dictconfig:DictConfig",
        "omegaconf.listconfig:ListConfig", "omegaconf.base:ContainerMetadata", "omegaconf.base:Metadata",
        "omegaconf.nodes:*",
    ],
}

#: "module:name" (or "module:*") -> why a pickle may use it
SAFE_REASONS: dict[str, str] = {entry: reason for reason, entries in _SAFE_BY_REASON.items() for entry in entries}


def _by_module(entries) -> dict[str, object]:
    out: dict[str, object] = {}
    for entry in entries:
        module, _, name = entry.partition(":")
        if name == ALL:
            out[module] = ALL
        elif out.get(module) != ALL:
            out.setdefault(module, []).append(name)
    return out


# modelscan's shape (module -> [names] or "*"), which a settings file extends entry by entry
SAFE_GLOBALS: dict[str, object] = _by_module(SAFE_REASONS)

# Packages whose classes are reconstructed by the thousands in real checkpoints: a class from
# here used for construction is trusted (unless its arguments look like code or a path), as is
# a function named like a pickle-support helper (`_rebuild_*`, `_unpickle*`, `_reconstruct*`,
# `*_ctor`). Their other functions are not: calling one is reported like any unknown call.
# Standard-library modules are not here: their safe names are listed one by one above.
ECOSYSTEM_PACKAGES: tuple[str, ...] = (
    "torch", "torchvision", "torchaudio", "torchtext", "numpy", "scipy", "sklearn", "pandas", "xgboost",
    "lightgbm", "catboost", "ml_dtypes", "pytz", "dateutil", "transformers", "tokenizers", "accelerate", "peft", "trl", "diffusers",
    "sentence_transformers", "timm", "datasets", "safetensors", "keras", "tf_keras", "jax", "jaxlib",
    "flax", "optax", "lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics", "einops", "spacy", "thinc",
    "gensim", "statsmodels", "imblearn", "category_encoders", "optuna", "omegaconf", "hydra", "ultralytics",
    "mmcv", "mmengine", "detectron2", "fairseq", "sentencepiece", "open_clip", "onnx", "skops", "prophet",
    "sktime", "fastai", "fastcore", "nltk", "networkx", "PIL", "shap", "umap", "hdbscan", "pynndescent", "numba", "llvmlite",
    "joblib", "__torch__",
)
