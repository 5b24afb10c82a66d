# MOECAL_PROG_CC_MPI
# ------------------
# Use the MPI compiler wrapper as CC: $MPICC if set, else the first of
# mpicc.mpich, mpicc found in PATH.  A CC given by the user that already is
# an MPI wrapper (it compiles MPI_Init) is kept.
AC_DEFUN([MOECAL_PROG_CC_MPI], [
  AS_IF([test -n "$MPICC"], [CC=$MPICC],
        [test -z "$CC"], [AC_CHECK_PROGS([MPICC], [mpicc.mpich mpicc], [none])
                          AS_IF([test "x$MPICC" = xnone],
                                [AC_MSG_ERROR([no MPI compiler wrapper found: install mpich and libmpich-dev, or set MPICC])])
                          CC=$MPICC])
])
