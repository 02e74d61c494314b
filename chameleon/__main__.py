from chameleon.cli import main

raise SystemExit(main())
