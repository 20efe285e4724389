# Vectorizable sigmoid and tanh from activations.h, fused over float and double.
from cython cimport floating


cdef extern from "activations.h" nogil:
    float fc_sigmoid_f(float x)
    float fc_tanh_f(float x)
    double fc_sigmoid_d(double x)
    double fc_tanh_d(double x)


cdef inline floating sigmoid(floating x) noexcept nogil:
    if floating is float:
        return fc_sigmoid_f(x)
    else:
        return fc_sigmoid_d(x)


cdef inline floating tanh(floating x) noexcept nogil:
    if floating is float:
        return fc_tanh_f(x)
    else:
        return fc_tanh_d(x)
