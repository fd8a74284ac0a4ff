"""`python -m loadtest ...` is `pagestream bench serve ...`: the serving benchmark, without the engine's imports."""
import sys

from loadtest.serve import main

sys.exit(main())
