import sys

from moekit import main

sys.exit(main())
